"""Computed prompt prefixes kept per model, with the real gemma-3-270m: exact answers, cached_tokens, budget.

Greedy answers with the cache must equal answers without it (``prefix_cache_mb=0``), across interleaved
conversations that share a long system prompt, so later turns restore their prefix from the cache
rather than find it left in the context.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc.aio
import pytest

from common.inference import ChatMessage, ChatRequest, CompleteRequest, SamplingParams, TextChunk
from common.metrics import NodeMetrics
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import CHANNEL_OPTIONS, SERVER_OPTIONS
from common.types import Backend
from devkit.model_files import ModelFiles
from node.hardware import Hardware
from node.model_book import ModelBook
from node.pool import ModelPool, PoolSettings
from node.process import node_gauges
from node.runtimes.base import LoadContext, RuntimeSettings
from node.runtimes.llama import LlamaRuntime
from node.servicers.inference import NodeInferenceServicer

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
SYSTEM = (
    "You are the support assistant of the ACME hardware store. You answer questions about tools, opening "
    "hours, returns and deliveries. Be brief, friendly and precise; never invent prices. "
) * 10  # about 380 tokens with the chat template
ASK_A = "My drill stops after a minute of use and smells hot. The battery is new and fully charged. " * 3
ASK_B = "Can I return a ladder that I bought three weeks ago without the receipt, only the card slip? " * 3
CPU = Hardware(backend=Backend.CPU, backends=(Backend.CPU,), cpu_count=2, memory_total_mb=16384)


@dataclass
class Listener:
    reports: list[list[int]] = field(default_factory=list)

    def prefixes_changed(self, model_id: str, hashes: object) -> None:
        self.reports.append(list(hashes))  # type: ignore[call-overload]


def loaded(gemma: ModelFiles, mb: int, listener: Listener | None = None) -> Iterator[LlamaRuntime]:
    settings = RuntimeSettings(threads=2, prefix_cache_mb=mb)
    runtime = LlamaRuntime(LoadContext(gemma.model, gemma.paths, settings, prefix_listener=listener))
    runtime.load()
    yield runtime
    runtime.unload()


@pytest.fixture(scope="module")
def cached(gemma: ModelFiles) -> Iterator[LlamaRuntime]:
    yield from loaded(gemma, 64)


@pytest.fixture(scope="module")
def uncached(gemma: ModelFiles) -> Iterator[LlamaRuntime]:
    yield from loaded(gemma, 0)


def chat(runtime: LlamaRuntime, messages: list[ChatMessage]) -> tuple[str, TextChunk]:
    chunks = list(runtime.chat(ChatRequest("gemma-3-270m", tuple(messages), GREEDY), threading.Event()))
    return "".join(c.delta for c in chunks), chunks[-1]


def complete(runtime: LlamaRuntime, prompt: str) -> tuple[str, TextChunk]:
    chunks = list(runtime.complete(CompleteRequest("gemma-3-270m", prompt, GREEDY), threading.Event()))
    return "".join(c.delta for c in chunks), chunks[-1]


def conversation(runtime: LlamaRuntime) -> list[tuple[str, int]]:
    """Two conversations, interleaved, two turns each, then two completions sharing a long prefix."""
    out: list[tuple[str, int]] = []
    a = [ChatMessage("system", SYSTEM), ChatMessage("user", ASK_A)]
    b = [ChatMessage("system", SYSTEM), ChatMessage("user", ASK_B)]
    for turn in (a, b, a, b):
        answer, last = chat(runtime, turn)
        assert last.usage is not None
        out.append((answer, last.usage.cached_tokens))
        turn += [ChatMessage("assistant", answer), ChatMessage("user", "Thanks. What should I do next?")]
    story = "The lighthouse keeper climbed the stairs every evening to light the lamp. " * 12
    for ending in (" One night", " Years later"):
        text, last = complete(runtime, story + ending)
        assert last.usage is not None
        out.append((text, last.usage.cached_tokens))
    return out


def test_greedy_answers_with_the_cache_equal_those_without_it(
    cached: LlamaRuntime, uncached: LlamaRuntime
) -> None:
    with_cache = conversation(cached)
    without = conversation(uncached)
    assert [a for a, _ in with_cache] == [a for a, _ in without]
    assert with_cache[0][1] == 0  # the first prompt finds nothing
    # A's second turn starts after B's first: its longer prefix comes back from the cache, beyond the
    # system prompt that B left in the context (which is all the cacheless runtime can reuse).
    assert with_cache[2][1] > without[2][1] > 0
    assert with_cache[5][1] > 0  # the second completion reuses the first one's prefix
    assert cached.prefix_cache_bytes > 0 and cached.prefix_hashes()


def test_cache_bytes_stay_within_a_small_budget(gemma: ModelFiles) -> None:
    runtime = next(loaded(gemma, 3))
    try:
        held = []
        for i in range(8):
            words = " ".join(f"item{i}-{j}" for j in range(20 + 25 * (i % 4)))
            complete(runtime, f"List number {i}: {words}")
            held.append(runtime.prefix_cache_bytes)
            assert runtime.prefix_cache_bytes <= 3 * 1024 * 1024
        assert max(held) > 0
    finally:
        runtime.unload()


def test_a_reloaded_model_reuses_no_prefix_and_reports_none_while_unloaded(gemma: ModelFiles) -> None:
    listener = Listener()
    runtime = next(loaded(gemma, 64, listener))
    prompt = "The river winds through the valley past the old mill and the orchards. " * 10
    complete(runtime, prompt)
    assert complete(runtime, prompt)[1].usage.cached_tokens > 0  # type: ignore[union-attr]
    assert listener.reports and listener.reports[-1]
    runtime.unload()
    assert listener.reports[-1] == []  # the balancer hears the model keeps nothing
    runtime.load()
    try:
        assert complete(runtime, prompt)[1].usage.cached_tokens == 0  # type: ignore[union-attr]
    finally:
        runtime.unload()


async def test_cached_tokens_reach_the_client_through_the_nodes_grpc_inference(gemma: ModelFiles) -> None:
    async def resolve(model_id: str) -> ModelFiles:
        return gemma

    pool = ModelPool(CPU, PoolSettings(prefix_cache_mb=64, engine_threads=2))
    server = grpc.aio.server(options=SERVER_OPTIONS)
    metrics = NodeMetrics(lambda: node_gauges(ModelBook(), pool))
    servicer = NodeInferenceServicer(pool, resolve, lambda: "node-test", metrics=metrics)
    igrpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    stub: object = igrpc.InferenceStub(channel)

    async def usage(system: str, user: str) -> Any:
        request = ipb.ChatRequest(
            model="gemma-3-270m",
            messages=[
                ipb.ChatMessage(role="system", content=system),
                ipb.ChatMessage(role="user", content=user),
            ],
            params=ipb.SamplingParams(max_tokens=4, temperature=0.0),
        )
        chunks = [c async for c in stub.Chat(request)]  # type: ignore[attr-defined]
        return chunks[-1].usage

    try:
        first = await usage(SYSTEM, "Hello?")
        assert first.cached_tokens == 0 and first.prompt_tokens > 256
        again = await usage(SYSTEM, "When do you open on Sundays?")
        assert again.cached_tokens >= 256 and again.prompt_tokens > again.cached_tokens
        fresh = await usage("You are a pirate.", "Hello?")
        assert fresh.cached_tokens == 0
        scraped = metrics.exposition()[0].decode()
        series = 'xllm_prompt_tokens_total{model="gemma-3-270m",source="cached"}'
        cached = f"{series} {float(again.cached_tokens)}"
        assert cached in scraped
        computed = first.prompt_tokens + again.prompt_tokens - again.cached_tokens + fresh.prompt_tokens
        assert f'source="computed"}} {float(computed)}' in scraped
        assert 'xllm_prefix_cache_bytes{model="gemma-3-270m"}' in scraped
    finally:
        await channel.close(grace=None)
        await server.stop(grace=None)
        await pool.close()
