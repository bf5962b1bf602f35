"""Continuous batching: aggregate generation tokens/s with 1, 2, 4 and 8 concurrent streams on one node.

Both engines run gemma-3-270m (Q4_K_M) through ``ModelPool`` with the same prompts, greedy sampling and
the same thread count, each round in a fresh child process of its own (two engines in one process share
llama.cpp's CPU thread teams and slow each other down, the batched one several-fold): "one context per
slot" is the engine before batching (``XLLM_BATCHING=0``), "batched" the scheduler with one context and
a sequence per slot. The engines take turns round by round. Also measured on each: the time to the
first token of a short request sent while a 2,000-token prompt is being evaluated, the resident
memory each extra sequence takes, and what one step of the batched engine costs by the number of
sequences in it (its decode alone, with and without the logits): the most batching can give on this
machine, before prompts, sampling and streaming take their share.
Goals on a 2-core machine: batched >= 2x at 4 streams, single stream within 5 %, that first token <= 1 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.generation import CONTEXT_TOKENS, engine_threads
from common.inference import CompleteRequest, SamplingParams
from devkit.model_files import ModelFiles, packaged_files
from devkit.packaged_models import GEMMA
from node.hardware import detect
from node.kinds import COMPLETE
from node.pool import ModelPool, PoolSettings, resident_mb

TOKENS = 48
STREAMS = (1, 2, 4, 8)
ROUNDS = 4
STEP_REPEATS = 15
PROMPTS = [
    f"Story number {i}: here is a long story about a lighthouse keeper and the sea. Once upon a time,"
    for i in range(8)
]
LONG = "The lighthouse keeper climbed the stairs every evening to light the lamp. " * 140  # ~2,000 tokens


async def _one(pool: ModelPool, files: ModelFiles, prompt: str, n: int) -> tuple[int, float]:
    """Tokens produced and seconds to the first chunk."""
    request = CompleteRequest("gemma-3-270m", prompt, SamplingParams(max_tokens=n, temperature=0.0, seed=1))
    started = time.perf_counter()
    first = 0.0
    produced = 0
    async for chunk in pool.stream(COMPLETE, files, request):
        if not first:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            produced = chunk.usage.completion_tokens
    return produced, first


async def _aggregate(pool: ModelPool, files: ModelFiles, streams: int) -> float:
    started = time.perf_counter()
    results = await asyncio.gather(*(_one(pool, files, PROMPTS[i], TOKENS) for i in range(streams)))
    return sum(n for n, _ in results) / (time.perf_counter() - started)


async def _short_under_long(pool: ModelPool, files: ModelFiles) -> float:
    """Seconds to a short request's first token while a 2,000-token prompt is being evaluated."""
    long = asyncio.ensure_future(_one(pool, files, LONG, 1))
    await asyncio.sleep(0.3)  # the long prompt's evaluation is under way
    _, first = await _one(pool, files, "Hello, how are", 4)
    await long
    return first


def _pool(batching: bool, slots: int = 8) -> ModelPool:
    settings = PoolSettings(
        engine_threads=engine_threads(),
        context_tokens=CONTEXT_TOKENS,
        slots_per_model=slots,
        batching=batching,
        prefix_cache_mb=0,
    )
    return ModelPool(detect(), settings)


async def _memory_per_sequence(files: ModelFiles) -> tuple[int, int]:
    """Resident MB after loading (batched) with 1 and with 8 sequences, each load alone."""
    out = []
    for slots in (1, 8):
        before = resident_mb()
        pool = _pool(True, slots)
        await _one(pool, files, PROMPTS[0], 2)
        out.append(resident_mb() - before)
        await pool.close()
    return out[0], out[1]


async def _measure(batching: bool) -> dict[str, float]:
    """One engine's round, in this (fresh) process: tokens/s per stream count and the first token."""
    files = packaged_files(GEMMA)
    pool = _pool(batching)
    try:
        await _one(pool, files, PROMPTS[0], 4)  # load and warm
        out = {str(streams): await _aggregate(pool, files, streams) for streams in STREAMS}
        out["first"] = await _short_under_long(pool, files)
    finally:
        await pool.close()
    return out


def _step_costs() -> dict[str, float]:
    """Milliseconds of one batched decode of k generated tokens, one in each of k sequences (median of
    ``STEP_REPEATS``), with the logits every token needs and without them (the output layer left out)."""
    from llama_cpp import Llama

    from node.runtimes.llama_batch import BatchScheduler
    from node.runtimes.llama_state import BLOCK

    path = str(next(iter(packaged_files(GEMMA).paths.values())))
    threads = engine_threads()
    llm = Llama(model_path=path, n_ctx=BLOCK, n_threads=threads, n_threads_batch=threads, verbose=False)
    engine = BatchScheduler(
        llm, sequences=max(STREAMS), context_tokens=CONTEXT_TOKENS, threads=threads, cache=None, exact=False
    )
    prompt = llm.tokenize(PROMPTS[0].encode())
    out: dict[str, float] = {}
    try:  # decoded here, not on the engine's thread: it has no job, so it never decodes
        for wants in (True, False):
            for k in STREAMS:
                for seq in range(k):
                    engine._clear(seq)
                    engine._decode([(t, p, seq, p == len(prompt) - 1) for p, t in enumerate(prompt)])
                times = []
                for step in range(STEP_REPEATS):
                    items = [(prompt[step % len(prompt)], len(prompt) + step, seq, wants) for seq in range(k)]
                    started = time.perf_counter()
                    engine._decode(items)
                    times.append(time.perf_counter() - started)
                out[f"{k}{'' if wants else '-'}"] = statistics.median(times) * 1000
    finally:
        engine.close()
        llm.close()
    return out


async def _round_in_child(mode: str) -> dict[str, float]:
    """A fresh process's measurement: "1" the batched engine's round, "0" the old one's, "steps"."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "round.json")
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.bench_batching",
            mode,
            out,
            stdout=asyncio.subprocess.DEVNULL,
        )
        if await child.wait() != 0:
            raise RuntimeError(f"the batching bench's child exited {child.returncode}")
        result: dict[str, float] = json.loads(await asyncio.to_thread(Path(out).read_text, encoding="utf-8"))
    return result


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.0f}-{max(values):.0f})"


async def run() -> str:
    files = packaged_files(GEMMA)
    load_before = os.getloadavg()[0]
    engines = {"one context per slot": False, "batched": True}
    rates: dict[str, dict[int, list[float]]] = {name: {s: [] for s in STREAMS} for name in engines}
    firsts: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(ROUNDS):
        order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
        for name in order:
            result = await _round_in_child("1" if engines[name] else "0")
            for streams in STREAMS:
                rates[name][streams].append(result[str(streams)])
            firsts[name].append(result["first"])
    steps = await _round_in_child("steps")
    load_after = os.getloadavg()[0]
    one_mb, eight_mb = await _memory_per_sequence(files)
    old, new = rates["one context per slot"], rates["batched"]
    speedup4 = statistics.median(new[4]) / statistics.median(old[4])
    single = statistics.median(new[1]) / statistics.median(old[1])
    first = statistics.median(firsts["batched"])
    lines = [
        "## Continuous batching: aggregate tokens/s by concurrent streams (gemma-3-270m Q4_K_M, CPU)",
        "",
        f"{ROUNDS} rounds; in each, every engine serves 1, 2, 4 and 8 concurrent greedy completions of "
        f"{TOKENS} tokens (different prompts), the engines taking turns in an order that alternates. "
        f"Both through ModelPool with 8 slots, {engine_threads()} threads, no prefix cache, each engine's "
        "round in a fresh process of its own; the engines take turns so that a slower spell of the "
        f"machine falls on both. 1-minute load average {load_before:.1f} at the start and "
        f"{load_after:.1f} at the end, on {os.cpu_count()} cores (the bench's own processes count in it). "
        "One context per slot runs 2 threads per stream, so it oversubscribes the cores as streams are "
        "added. Each cell: the median of the rounds (lowest-highest).",
        "",
        "| streams | one context per slot, tokens/s | batched, tokens/s | batched / old |",
        "|---|---|---|---|",
    ]
    for streams in STREAMS:
        a, b = statistics.median(old[streams]), statistics.median(new[streams])
        lines.append(f"| {streams} | {_spread(old[streams])} | {_spread(new[streams])} | {b / a:.2f}x |")
    lines += [
        "",
        f"- 4 streams, batched / old: {speedup4:.2f}x (goal ≥ 2x: {'met' if speedup4 >= 2 else 'missed'})",
        f"- 1 stream, batched / old: {single:.1%} (goal within 5 %: {'met' if single >= 0.95 else 'missed'})",
        f"- first token of a short request sent while a ~2,000-token prompt is evaluated: batched "
        f"{first:.2f} s (goal ≤ 1 s: {'met' if first <= 1.0 else 'missed'}), one context per slot "
        f"{statistics.median(firsts['one context per slot']):.2f} s",
        f"- resident memory after one request, batched: {one_mb} MB with 1 sequence, {eight_mb} MB with 8 "
        f"({(eight_mb - one_mb) / 7:.0f} MB per extra sequence of {CONTEXT_TOKENS} tokens)",
        "- one step of the batched engine, decoding one token in each of 1, 2, 4 and 8 sequences (median of "
        f"{STEP_REPEATS} decodes, in a process of its own): "
        + ", ".join(f"{steps[str(k)]:.1f}" for k in STREAMS)
        + " ms; without the logits (the output layer left out) "
        + ", ".join(f"{steps[f'{k}-']:.1f}" for k in STREAMS)
        + " ms. Steps alone, with no prompt to evaluate, would give 4 streams "
        f"{4000 / steps['4']:.0f} tokens/s, {4000 / steps['4'] / statistics.median(old[4]):.2f}x the old "
        "engine's measured rate: the most batching can give here",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # for ``run``: "1" the batched engine's round, "0" the old one's, "steps"
    result = _step_costs() if sys.argv[1] == "steps" else asyncio.run(_measure(sys.argv[1] == "1"))
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        json.dump(result, fh)
