"""Node generation speed: tokens/s through the node's Inference door vs llama-cpp-python called directly.

Both run gemma-3-270m (Q4_K_M) in this process with the same prompt, greedy sampling, the same thread
count and the same number of generated tokens. "direct" is ``Llama.create_completion(stream=True)``;
"node" is a gRPC client on 127.0.0.1 -> NodeInferenceServicer -> ModelPool -> the llama.cpp runtime.
Goal: the node keeps at least 98 % of the direct rate.

The paths take turns within each round, their order rotating from round to round, and the verdict is
the median of each round's node / direct ratio: on a shared machine a neighbour's burst slows whichever
path is running, so comparing two medians taken at different moments says more about the neighbours
than about the node.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc.aio

from bench.generation import (
    CONTEXT_TOKENS,
    PROMPT,
    direct_round,
    direct_tokens,
    engine_threads,
    grpc_round,
    open_llama,
    timed_generation,
)
from bench.quiet import QuietRounds, Round
from common.inference import CompleteRequest, SamplingParams
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import CHANNEL_OPTIONS, SERVER_OPTIONS
from devkit.model_files import ModelFiles, packaged_files
from devkit.packaged_models import GEMMA
from node.hardware import detect
from node.kinds import COMPLETE
from node.pool import ModelPool, PoolSettings
from node.servicers.inference import NodeInferenceServicer

TOKENS = 128
ROUNDS = 15
THREAD_ROUNDS = 4
GOAL = 0.98


async def _pool_round(pool: ModelPool, files: ModelFiles, n: int) -> tuple[int, float]:
    request = CompleteRequest("gemma-3-270m", PROMPT, SamplingParams(max_tokens=n, temperature=0.0, seed=1))
    started = time.perf_counter()
    produced = 0
    async for chunk in pool.stream(COMPLETE, files, request):
        if chunk.usage is not None:
            produced = chunk.usage.completion_tokens
    return produced, time.perf_counter() - started


async def _threads_compared(llm: Any, quiet: QuietRounds) -> tuple[list[float], list[float]]:
    """Direct generation from a fresh thread per call, from two long-lived threads in turn, then fresh again.

    The long-lived threads' OpenMP teams stay until the threads end, so their rounds come as one block
    and the threads are ended before the last fresh block.
    """
    loop = asyncio.get_running_loop()
    fresh: list[float] = []
    kept: list[float] = []

    async def measure(rates: list[float], seconds: Callable[[], Awaitable[float]]) -> None:
        async def one() -> tuple[int, float]:
            return TOKENS, await seconds()

        n, took, _ = await quiet.measure(one)
        rates.append(n / took)

    for _ in range(THREAD_ROUNDS):
        await measure(fresh, lambda: direct_round(llm, TOKENS))
    workers = [ThreadPoolExecutor(1, f"bench-kept-{i}") for i in range(2)]
    try:
        for i in range(2 * THREAD_ROUNDS):
            await measure(
                kept, functools.partial(loop.run_in_executor, workers[i % 2], timed_generation, llm, TOKENS)
            )
    finally:
        for worker in workers:
            worker.shutdown(wait=True)
    for _ in range(THREAD_ROUNDS):
        await measure(fresh, lambda: direct_round(llm, TOKENS))
    return fresh, kept


async def run() -> str:
    files = packaged_files(GEMMA)
    threads = engine_threads()
    settings = PoolSettings(engine_threads=threads, context_tokens=CONTEXT_TOKENS)
    llm = await open_llama(next(iter(files.paths.values())))

    async def resolve(model_id: str) -> ModelFiles:
        return files

    pool = ModelPool(detect(), settings)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    igrpc.add_InferenceServicer_to_server(NodeInferenceServicer(pool, resolve, lambda: "bench"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    direct: list[float] = []
    node: list[float] = []
    in_pool: list[float] = []
    quiet = QuietRounds()  # everything measured runs in this process
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            stub = igrpc.InferenceStub(channel)
            await grpc_round(stub, 8)  # load and warm
            expected = await direct_tokens(llm, TOKENS)

            async def via_direct() -> tuple[int, float]:
                return expected, await direct_round(llm, TOKENS)

            async def via_node() -> tuple[int, float]:
                n, seconds = await grpc_round(stub, TOKENS)
                assert n == expected, f"node generated {n} tokens, direct {expected}"
                return n, seconds

            paths: dict[str, tuple[Round, list[float]]] = {
                "direct": (via_direct, direct),
                "node": (via_node, node),
                "pool": (lambda: _pool_round(pool, files, TOKENS), in_pool),
            }
            order = list(paths)
            for round_ in range(ROUNDS):
                for name in order[round_ % 3 :] + order[: round_ % 3]:
                    one, rates = paths[name]
                    n, seconds, _ = await quiet.measure(one)
                    rates.append(n / seconds)
            fresh, kept = await _threads_compared(llm, quiet)
    finally:
        await server.stop(grace=None)
        await pool.close()
        llm.close()

    paired = statistics.median(n / d for n, d in zip(node, direct, strict=True))
    pool_paired = statistics.median(p / d for p, d in zip(in_pool, direct, strict=True))
    ratio = statistics.median(node) / statistics.median(direct)
    verdict = "met" if paired >= GOAL else "missed"
    return "\n".join(
        [
            "## Node runtime: generation tokens/s (gemma-3-270m Q4_K_M, CPU)",
            "",
            f"{ROUNDS} rounds of {TOKENS} generated tokens each way, the three paths taking turns in an "
            f"order that rotates each round; greedy, {threads} threads, prompt processing included. The gRPC "
            "client shares the node's process and event loop. `direct` streams through "
            "`create_completion`, which does more Python work per token than the `generate` loop the "
            "node's runtime drives; it runs each call on a thread of its own, as the node does (see "
            "below). " + QuietRounds.method("this process"),
            "",
            "| path | median tokens/s | min | max |",
            "|---|---|---|---|",
            f"| llama-cpp-python direct (create_completion, stream) | {statistics.median(direct):.1f} | "
            f"{min(direct):.1f} | {max(direct):.1f} |",
            f"| node: gRPC -> InferenceServicer -> ModelPool -> runtime | {statistics.median(node):.1f} | "
            f"{min(node):.1f} | {max(node):.1f} |",
            f"| ModelPool -> runtime, no gRPC | {statistics.median(in_pool):.1f} | "
            f"{min(in_pool):.1f} | {max(in_pool):.1f} |",
            "",
            f"- node / direct, median of the per-round ratios: {paired:.1%} (goal ≥ {GOAL:.0%}: {verdict}); "
            f"ratio of the medians: {ratio:.1%}",
            f"- pool without gRPC / direct, median of the per-round ratios: {pool_paired:.1%}",
            quiet.summary(),
            "",
            "### Why the node starts a thread for each engine call",
            "",
            f"llama-cpp-python direct again, {TOKENS} tokens a round: {THREAD_ROUNDS} rounds each on a fresh "
            f"thread, then {2 * THREAD_ROUNDS} rounds taking turns between two long-lived threads (a pool's "
            f"way), which are then ended, then {THREAD_ROUNDS} more fresh rounds. Every thread that has "
            "called llama.cpp keeps an OpenMP team for as long as it lives; once the teams' threads "
            "outnumber the cores, OpenMP makes every team spin less between steps.",
            "",
            "| calling threads | median tokens/s | min | max |",
            "|---|---|---|---|",
            f"| a fresh thread per call (the node's way) | {statistics.median(fresh):.1f} | {min(fresh):.1f} "
            f"| {max(fresh):.1f} |",
            f"| two long-lived threads in turn | {statistics.median(kept):.1f} | {min(kept):.1f} "
            f"| {max(kept):.1f} |",
            "",
            f"- two long-lived threads / a fresh thread per call: "
            f"{statistics.median(kept) / statistics.median(fresh):.1%}",
            "",
        ]
    )
