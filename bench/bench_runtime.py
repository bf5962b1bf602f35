"""Node generation speed: tokens/s through the node's Inference door vs llama-cpp-python called directly.

Both run gemma-3-270m (Q4_K_M) in this process with the same prompt, greedy sampling, the same thread
count and the same number of generated tokens. "direct" is ``Llama.create_completion(stream=True)``;
"node" is a gRPC client on 127.0.0.1 -> InferenceServicer -> ModelPool -> the llama.cpp runtime.
Goal: the node keeps at least 98 % of the direct rate.

The paths take turns within each round, their order rotating from round to round, and the verdict is
the median of each round's node / direct ratio: on a shared machine a neighbour's burst slows whichever
path is running, so comparing two medians taken at different moments says more about the neighbours
than about the node.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import grpc.aio

from common.inference import CompleteRequest, SamplingParams
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import CHANNEL_OPTIONS, SERVER_OPTIONS
from node.hardware import detect
from node.pool import ModelPool, PoolSettings
from node.servicers.inference import InferenceServicer
from tests.fixtures.models import ModelFiles, gemma_files

PROMPT = "Here is a long story about a lighthouse keeper and the sea. Once upon a time,"
TOKENS = 128
ROUNDS = 9
GOAL = 0.98


def _direct_tokens(llm: Any, n: int) -> int:
    """How many tokens greedy decoding of PROMPT yields (stream chunks need not be one token each)."""
    result = llm.create_completion(PROMPT, max_tokens=n, temperature=0.0, seed=1)
    return int(result["usage"]["completion_tokens"])


def _direct_round(llm: Any, n: int) -> float:
    started = time.perf_counter()
    for _ in llm.create_completion(PROMPT, max_tokens=n, temperature=0.0, stream=True, seed=1):
        pass
    return time.perf_counter() - started


async def _node_round(stub: Any, n: int) -> tuple[int, float]:
    request = ipb.CompleteRequest(
        model="gemma-3-270m", prompt=PROMPT, params=ipb.SamplingParams(max_tokens=n, temperature=0.0, seed=1)
    )
    started = time.perf_counter()
    produced = 0
    async for chunk in stub.Complete(request):
        if chunk.finish_reason:
            produced = chunk.usage.completion_tokens
    return produced, time.perf_counter() - started


async def _pool_round(pool: ModelPool, files: ModelFiles, n: int) -> tuple[int, float]:
    request = CompleteRequest("gemma-3-270m", PROMPT, SamplingParams(max_tokens=n, temperature=0.0, seed=1))
    started = time.perf_counter()
    produced = 0
    async for chunk in pool.complete(files, request):
        if chunk.usage is not None:
            produced = chunk.usage.completion_tokens
    return produced, time.perf_counter() - started


async def run() -> str:
    from llama_cpp import Llama

    files = gemma_files()
    threads = os.cpu_count() or 1
    settings = PoolSettings(engine_threads=threads, context_tokens=4096)
    path = str(next(iter(files.paths.values())))
    llm = Llama(model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)

    async def resolve(model_id: str) -> ModelFiles:
        return files

    pool = ModelPool(detect(), settings)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    igrpc.add_InferenceServicer_to_server(InferenceServicer(pool, resolve, lambda: "bench"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    direct: list[float] = []
    node: list[float] = []
    in_pool: list[float] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            stub = igrpc.InferenceStub(channel)
            await _node_round(stub, 8)  # load and warm
            expected = _direct_tokens(llm, TOKENS)

            async def via_direct() -> None:
                direct.append(expected / _direct_round(llm, TOKENS))

            async def via_node() -> None:
                n, seconds = await _node_round(stub, TOKENS)
                assert n == expected, f"node generated {n} tokens, direct {expected}"
                node.append(n / seconds)

            async def via_pool() -> None:
                n, seconds = await _pool_round(pool, files, TOKENS)
                in_pool.append(n / seconds)

            turns = [via_direct, via_node, via_pool]
            for round_ in range(ROUNDS):
                for take in turns[round_ % 3 :] + turns[: round_ % 3]:
                    await take()
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
            "node's runtime drives.",
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
            "",
        ]
    )
