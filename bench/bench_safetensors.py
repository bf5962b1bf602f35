"""Generation speed of one model in both formats on one node: the safetensors copy with transformers
(PyTorch, float32, CPU) beside the GGUF (Q4_K_M) with llama.cpp.

Both copies of gemma-3-270m load into one ``ModelPool`` with the node's settings (one engine thread per
core for both), and each round generates the same number of tokens from the same prompt, greedy, one
path after the other, their order alternating. Tokens/s counts prompt processing too, as a caller sees
it. The safetensors copy is the tests' (``devkit.safetensors_copy``: converted once under build/).
"""

from __future__ import annotations

import statistics
import time

from bench.generation import CONTEXT_TOKENS, PROMPT, engine_threads
from bench.quiet import QuietRounds, Round
from common.inference import CompleteRequest, SamplingParams
from devkit.model_files import ModelFiles, packaged_files
from devkit.packaged_models import GEMMA
from devkit.safetensors_copy import safetensors_copy, safetensors_files
from node.hardware import detect
from node.kinds import COMPLETE
from node.pool import ModelPool, PoolSettings

TOKENS = 32
ROUNDS = 5


async def _round(pool: ModelPool, files: ModelFiles, n: int) -> tuple[int, float]:
    request = CompleteRequest(files.model.id, PROMPT, SamplingParams(max_tokens=n, temperature=0.0, seed=1))
    started = time.perf_counter()
    produced = 0
    async for chunk in pool.stream(COMPLETE, files, request):
        if chunk.usage is not None:
            produced = chunk.usage.completion_tokens
    return produced, time.perf_counter() - started


async def run() -> str:
    gguf = packaged_files(GEMMA)
    st = safetensors_files(safetensors_copy(next(iter(gguf.paths.values()))))
    threads = engine_threads()
    pool = ModelPool(detect(), PoolSettings(engine_threads=threads, context_tokens=CONTEXT_TOKENS))
    rates: dict[str, list[float]] = {"llama.cpp": [], "transformers": []}
    loads: dict[str, float] = {}
    quiet = QuietRounds()
    try:
        for name, files in (("llama.cpp", gguf), ("transformers", st)):
            started = time.perf_counter()
            await _round(pool, files, 4)  # load and warm
            loads[name] = time.perf_counter() - started
        paths: dict[str, Round] = {
            "llama.cpp": lambda: _round(pool, gguf, TOKENS),
            "transformers": lambda: _round(pool, st, TOKENS),
        }
        order = list(paths)
        for round_ in range(ROUNDS):
            for name in order if round_ % 2 == 0 else order[::-1]:
                n, seconds, _ = await quiet.measure(paths[name])
                rates[name].append(n / seconds)
    finally:
        await pool.close()

    def row(name: str, what: str) -> str:
        r = rates[name]
        return f"| {what} | {statistics.median(r):.1f} | {min(r):.1f} | {max(r):.1f} | {loads[name]:.1f} |"

    ratio = statistics.median(rates["transformers"]) / statistics.median(rates["llama.cpp"])
    return "\n".join(
        [
            "## Safetensors beside GGUF: generation tokens/s of one model on one node (CPU)",
            "",
            f"gemma-3-270m, {ROUNDS} rounds of {TOKENS} generated tokens each way from the same prompt, "
            f"greedy, {threads} engine threads for both, prompt processing included; the two paths take "
            "turns, their order alternating. Both load into one `ModelPool` with the node's settings. "
            + QuietRounds.method("this process"),
            "",
            "| model and engine | median tokens/s | min | max | first call (load + 4 tokens), s |",
            "|---|---|---|---|---|",
            row("llama.cpp", "GGUF Q4_K_M, llama.cpp"),
            row("transformers", "safetensors float32, transformers on PyTorch (CPU)"),
            "",
            f"- transformers / llama.cpp, ratio of the medians: {ratio:.1%}. The safetensors copy is the "
            "GGUF dequantised to float32 (about 4 times the bytes read per token), and PyTorch runs one "
            "Python-driven forward pass per token; llama.cpp reads 4-bit weights in fused kernels.",
            quiet.summary(),
            "",
        ]
    )
