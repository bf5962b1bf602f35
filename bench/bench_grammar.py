"""The cost of grammar-constrained sampling: tokens/s free vs under a JSON Schema, same prompt, same node.

All paths run gemma-3-270m (Q4_K_M) in this process through the node's ``ModelPool`` and llama.cpp
runtime, greedy, with the same prompt and token budget. "free" samples freely; "json_schema" samples
under the grammar built from a schema (the node's filter, which asks the grammar about the likeliest
candidates first); "json_schema, whole vocabulary" samples under the same grammar the way
llama-cpp-python does it by itself (every token of the vocabulary checked at every step), called directly.
Rates include prompt processing; each answer's own token count is used, since a JSON answer may end
before the budget. The paths take turns within each round, in an order that rotates.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from bench.generation import CONTEXT_TOKENS, engine_threads, on_own_thread, open_llama
from bench.quiet import QuietRounds, Round
from common.inference import CompleteRequest, ResponseFormat, ResponseFormatType, SamplingParams
from devkit.model_files import ModelFiles, packaged_files
from devkit.packaged_models import GEMMA
from node.hardware import detect
from node.kinds import COMPLETE
from node.pool import ModelPool, PoolSettings
from node.runtimes.grammar import response_grammar

TOKENS = 64
ROUNDS = 5
PROMPT = "A short story about a lighthouse keeper, as JSON:"
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "story": {"type": "string", "maxLength": 600},
    },
    "required": ["title", "story"],
}
FORMAT = ResponseFormat(ResponseFormatType.JSON_SCHEMA, json.dumps(SCHEMA))


async def _pool_round(pool: ModelPool, files: ModelFiles, fmt: ResponseFormat) -> tuple[int, float]:
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, seed=1, response_format=fmt)
    started = time.perf_counter()
    produced = 0
    async for chunk in pool.stream(COMPLETE, files, CompleteRequest("gemma-3-270m", PROMPT, params)):
        if chunk.usage is not None:
            produced = chunk.usage.completion_tokens
    return produced, time.perf_counter() - started


def _whole_vocabulary(llm: Any, grammar: str) -> tuple[int, float]:
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    started = time.perf_counter()
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    produced = 0
    for token in llm.generate(prompt, temp=0.0, top_k=1, grammar=LlamaGrammar.from_string(grammar)):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        produced += 1
        if produced >= TOKENS:
            break
    return produced, time.perf_counter() - started


async def run() -> str:
    files = packaged_files(GEMMA)
    threads = engine_threads()
    pool = ModelPool(detect(), PoolSettings(engine_threads=threads, context_tokens=CONTEXT_TOKENS))
    llm = await open_llama(next(iter(files.paths.values())))
    grammar = response_grammar(FORMAT)
    assert grammar is not None
    rates: dict[str, list[float]] = {"free": [], "json_schema": [], "json_schema, whole vocabulary": []}
    quiet = QuietRounds()
    try:
        await _pool_round(pool, files, ResponseFormat())  # load and warm

        async def whole_vocabulary() -> tuple[int, float]:
            return await on_own_thread(_whole_vocabulary, llm, grammar)

        paths: dict[str, Round] = {
            "free": lambda: _pool_round(pool, files, ResponseFormat()),
            "json_schema": lambda: _pool_round(pool, files, FORMAT),
            "json_schema, whole vocabulary": whole_vocabulary,
        }
        order = list(paths)
        for round_ in range(ROUNDS):
            for name in order[round_ % 3 :] + order[: round_ % 3]:
                n, seconds, _ = await quiet.measure(paths[name])
                rates[name].append(n / seconds)
    finally:
        await pool.close()
        llm.close()
    free = statistics.median(rates["free"])
    constrained = statistics.median(rates["json_schema"])
    whole = statistics.median(rates["json_schema, whole vocabulary"])
    rows = [
        f"| {name} | {statistics.median(r):.1f} | {min(r):.1f} | {max(r):.1f} |" for name, r in rates.items()
    ]
    return "\n".join(
        [
            "## Grammar-constrained sampling: free vs json_schema (gemma-3-270m Q4_K_M, CPU)",
            "",
            f"{ROUNDS} rounds of up to {TOKENS} tokens per path, the paths taking turns in an order that "
            f"rotates each round; greedy, {threads} threads, the same completion prompt, prompt processing "
            "included. `free` and `json_schema` go through the node's ModelPool and llama.cpp runtime; "
            "`whole vocabulary` is llama-cpp-python's own grammar sampling, called directly. "
            + QuietRounds.method("this process"),
            "",
            "| sampling | median tokens/s | min | max |",
            "|---|---|---|---|",
            *rows,
            "",
            f"- json_schema / free: {constrained / free:.1%}; whole vocabulary / free: {whole / free:.1%}",
            quiet.summary(),
            "",
        ]
    )
