"""Two GGUF models on one node: does one model's traffic slow the other more with batched engines than
with one context per slot?

With batching each loaded model has a scheduler thread of its own that decodes all its sequences in one
step (``node/runtimes/llama_batch.py``); two models are two such threads, each running llama.cpp with
one thread per core. One context per slot (``XLLM_BATCHING=0``) instead runs one engine call per
request. Measured for each engine, in a fresh child process per round (engines in one process share
llama.cpp's CPU thread teams): the aggregate tokens/s of model A's 2 concurrent streams alone, then
while model B serves 2 streams of its own at the same time. The slowdown is A's rate together over A's
rate alone. The only packaged GGUF is gemma-3-270m, so B is the same file under another model id: two
engines, two KV caches and two scheduler threads, sharing the mapped weights' pages.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.generation import CONTEXT_TOKENS, engine_threads
from common.inference import CompleteRequest, SamplingParams
from devkit.model_files import ModelFiles, packaged_files
from devkit.packaged_models import GEMMA
from node.hardware import detect
from node.kinds import COMPLETE
from node.pool import ModelPool, PoolSettings

TOKENS = 48
STREAMS = 2  # per model
ROUNDS = 2
PROMPTS = [
    f"Story number {i}: here is a long story about a lighthouse keeper and the sea. Once upon a time,"
    for i in range(2 * STREAMS)
]
ENGINES = {"one context per slot": False, "batched": True}


def _models() -> tuple[ModelFiles, ModelFiles]:
    a = packaged_files(GEMMA)
    b = ModelFiles(model=replace(a.model, id=f"{GEMMA}-b", name=f"{GEMMA}-b"), paths=a.paths)
    return a, b


async def _stream(pool: ModelPool, files: ModelFiles, prompt: str) -> int:
    request = CompleteRequest(
        files.model.id, prompt, SamplingParams(max_tokens=TOKENS, temperature=0.0, seed=1)
    )
    produced = 0
    async for chunk in pool.stream(COMPLETE, files, request):
        if chunk.usage is not None:
            produced = chunk.usage.completion_tokens
    return produced


async def _rate(pool: ModelPool, files: ModelFiles, prompts: list[str]) -> float:
    """Aggregate tokens/s of ``prompts`` served at once on ``files``."""
    started = time.perf_counter()
    produced = await asyncio.gather(*(_stream(pool, files, p) for p in prompts))
    return sum(produced) / (time.perf_counter() - started)


async def _measure(batching: bool) -> dict[str, float]:
    """One engine's round, in this (fresh) process: A alone, then A and B at once."""
    a, b = _models()
    settings = PoolSettings(
        engine_threads=engine_threads(),
        context_tokens=CONTEXT_TOKENS,
        slots_per_model=STREAMS,
        batching=batching,
        prefix_cache_mb=0,
    )
    pool = ModelPool(detect(), settings)
    try:
        await _stream(pool, a, PROMPTS[0])  # load and warm both
        await _stream(pool, b, PROMPTS[0])
        alone = await _rate(pool, a, PROMPTS[:STREAMS])
        both = await asyncio.gather(_rate(pool, a, PROMPTS[:STREAMS]), _rate(pool, b, PROMPTS[STREAMS:]))
    finally:
        await pool.close()
    return {"alone": alone, "a": both[0], "b": both[1]}


async def _round_in_child(batching: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "round.json")
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.bench_two_models",
            "1" if batching else "0",
            out,
            stdout=asyncio.subprocess.DEVNULL,
        )
        if await child.wait() != 0:
            raise RuntimeError(f"the two-models bench's child exited {child.returncode}")
        result: dict[str, float] = json.loads(await asyncio.to_thread(Path(out).read_text, encoding="utf-8"))
    return result


async def run() -> str:
    load_before = os.getloadavg()[0]
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in ENGINES}
    for round_ in range(ROUNDS):
        order = list(ENGINES) if round_ % 2 == 0 else list(reversed(ENGINES))
        for name in order:
            rounds[name].append(await _round_in_child(ENGINES[name]))
    load_after = os.getloadavg()[0]
    lines = [
        "## Two GGUF models on one node: how much one slows the other (gemma-3-270m Q4_K_M twice, CPU)",
        "",
        f"{ROUNDS} rounds; in each, every engine serves model A's {STREAMS} concurrent greedy completions of "
        f"{TOKENS} tokens alone, then A's {STREAMS} and model B's {STREAMS} at the same time (B: the same "
        "GGUF under another model id, the only GGUF packaged). Through ModelPool with "
        f"{STREAMS} slots per model, {engine_threads()} threads per engine call, no prefix cache, each "
        "engine's round in a fresh process of its own, the engines taking turns in an order that "
        "alternates. The machine was shared with other work while this ran (1-minute load average "
        f"{load_before:.1f} at the start, {load_after:.1f} at the end, on 2 cores): absolute numbers are "
        "low and noisy.",
        "",
        "| engine | A alone, tokens/s | A beside B, tokens/s | B beside A, tokens/s | A beside B / A alone "
        "| A+B / A alone |",
        "|---|---|---|---|---|---|",
    ]
    kept: dict[str, float] = {}
    for name in ENGINES:
        alone = statistics.median(r["alone"] for r in rounds[name])
        a = statistics.median(r["a"] for r in rounds[name])
        b = statistics.median(r["b"] for r in rounds[name])
        kept[name] = a / alone
        lines.append(
            f"| {name} | {alone:.1f} | {a:.1f} | {b:.1f} | {a / alone:.0%} | {(a + b) / alone:.2f}x |"
        )
    more = "more" if kept["batched"] < kept["one context per slot"] else "less"
    lines += [
        "",
        f"- beside a second model, A keeps {kept['batched']:.0%} of its rate batched and "
        f"{kept['one context per slot']:.0%} with one context per slot: two batched engines slow each "
        f"other {more} than two per-context engines do, on this run",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # one engine's round, for ``run``: "1" batched, "0" one context per slot
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        json.dump(asyncio.run(_measure(sys.argv[1] == "1")), fh)
