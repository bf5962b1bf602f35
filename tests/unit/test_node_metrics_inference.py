"""What the node's metrics say about its requests and downloads, and how a draining node answers.

Requests go through the real Inference servicer on a gRPC server on 127.0.0.1 with a real pool; the
engine is the small "counter" engine of the pool tests (it streams 1..n at a fixed pace). Downloads run
the real downloader against in-memory byte sources.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from common.errors import ErrorCode, LlmlbError
from common.metrics import NodeMetrics
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import CHANNEL_OPTIONS, SERVER_OPTIONS, error_from_rpc
from common.types import FileFormat, ManifestFile, Model, ModelSource, ModelState
from node.downloader import Downloader
from node.model_book import ModelBook
from node.pool import ModelPool, PoolSettings
from node.process import node_gauges
from node.runtimes.engines import Engines
from node.servicers.inference import NodeInferenceServicer
from node.storage import Storage
from tests.fixtures.eventually import eventually_async
from tests.unit.runtimes.test_pool import COUNTER, CPU, EVERY, Resolved, counter_model, every_kind_model
from tests.unit.test_node_storage import MemorySource, node_config

pytestmark = pytest.mark.timeout(30)


@dataclass
class Node:
    pool: ModelPool
    states: ModelBook
    servicer: NodeInferenceServicer
    metrics: NodeMetrics
    stub: Any  # an aio stub; grpc-stubs types stubs as synchronous
    draining: list[bool]

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    model = counter_model(tmp_path, "counter", 100)
    every = every_kind_model(tmp_path)  # serves every kind: speech, embeddings, ...
    models = {model.model.id: model, every.model.id: every}

    async def resolve(model_id: str) -> Resolved:
        if model_id not in models:
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} is not registered")
        return models[model_id]

    pool = ModelPool(CPU, PoolSettings(slots_per_model=1), Engines([COUNTER, EVERY]))
    states = ModelBook()
    metrics = NodeMetrics(lambda: node_gauges(states, pool))
    draining = [False]
    servicer = NodeInferenceServicer(
        pool, resolve, lambda: "node-test", metrics=metrics, draining=lambda: draining[0]
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    igrpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    try:
        yield Node(pool, states, servicer, metrics, igrpc.InferenceStub(channel), draining)
    finally:
        await channel.close(grace=None)
        await server.stop(grace=None)
        await pool.close()


def chat(n: int, model: str = "counter") -> ipb.ChatRequest:
    return ipb.ChatRequest(
        model=model,
        messages=[ipb.ChatMessage(role="user", content="count")],
        params=ipb.SamplingParams(max_tokens=n),
    )


async def test_a_finished_chat_is_counted_with_its_latency_tokens_and_time_to_first_token(
    node: Node,
) -> None:
    chunks = [c async for c in node.stub.Chat(chat(4))]
    assert chunks[-1].usage.completion_tokens == 4

    labels = {"door": "grpc", "route": "chat", "model": "counter", "code": "ok"}
    assert node.value("xllm_requests_total", **labels) == 1
    assert node.value("xllm_request_seconds_count", door="grpc", route="chat") == 1
    assert node.value("xllm_request_seconds_sum", door="grpc", route="chat") >= 4 * 0.02
    assert node.value("xllm_request_duration_seconds_count", door="grpc", route="chat") == 1
    assert node.value("xllm_time_to_first_token_seconds_count", route="chat") == 1
    assert node.value("xllm_tokens_total", model="counter", kind="prompt") == 1
    assert node.value("xllm_tokens_total", model="counter", kind="completion") == 4


async def test_the_memory_budget_and_each_loaded_models_share_of_it_are_scraped(node: Node) -> None:
    assert node.value("xllm_memory_budget_bytes") == node.pool.budget_mb * 1024 * 1024 > 0
    assert node.value("xllm_model_memory_bytes", model="counter") == 0
    [c async for c in node.stub.Chat(chat(1))]
    loaded = node.pool.memory_by_model()["counter"]
    assert node.value("xllm_model_memory_bytes", model="counter") == loaded * 1024 * 1024 > 0


async def test_failed_requests_are_counted_by_error_code_and_unknown_models_get_no_label(
    node: Node,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        [c async for c in node.stub.Complete(ipb.CompleteRequest(model="acme/nothing", prompt="x"))]
    with pytest.raises(grpc.aio.AioRpcError):  # an empty prompt is invalid for a model that exists
        [c async for c in node.stub.Complete(ipb.CompleteRequest(model="counter", prompt=""))]

    assert (
        node.value("xllm_requests_total", door="grpc", route="complete", model="", code="model_not_found")
        == 1
    )
    assert (
        node.value(
            "xllm_requests_total", door="grpc", route="complete", model="counter", code="invalid_request"
        )
        == 1
    )
    assert 'model="acme/nothing"' not in node.metrics.exposition()[0].decode()


async def test_a_client_that_goes_away_mid_stream_is_counted_as_cancelled(node: Node) -> None:
    call = node.stub.Chat(chat(200))
    await call.read()
    call.cancel()
    await eventually_async(
        lambda: (
            node.value("xllm_requests_total", door="grpc", route="chat", model="counter", code="cancelled")
            == 1
        ),
        5,
        "the cancelled chat counted",
    )
    assert node.servicer.in_flight == 0


async def test_queue_depth_active_requests_and_model_states_are_read_when_scraped(node: Node) -> None:
    node.states.set("acme/on-disk", ModelState.PRESENT)
    first = node.stub.Chat(chat(100))
    await first.read()  # holds the only slot
    second = node.stub.Chat(chat(1))
    await eventually_async(lambda: node.value("xllm_queue_depth") == 1, 5, "one request queued")

    text = node.metrics.exposition()[0].decode()
    assert "xllm_active_requests 1.0" in text
    assert "xllm_queue_depth 1.0" in text
    assert 'xllm_models{state="ready"} 1.0' in text
    assert 'xllm_models{state="present"} 1.0' in text
    assert 'xllm_models{state="failed"} 0.0' in text

    first.cancel()
    assert [c async for c in second][-1].usage.completion_tokens == 1
    await eventually_async(
        lambda: node.value("xllm_active_requests") == 0 and node.value("xllm_queue_depth") == 0,
        5,
        "nothing active or queued",
    )


async def test_a_draining_node_refuses_new_requests_while_the_one_in_flight_finishes(node: Node) -> None:
    chunks = aiter(node.stub.Chat(chat(30)))
    first = await anext(chunks)
    node.draining[0] = True

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        [c async for c in node.stub.Chat(chat(1))]
    error = error_from_rpc(refused.value)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (error.code, error.message) == (ErrorCode.NO_CAPABLE_NODES, "node node-test is draining")
    assert node.servicer.in_flight == 1

    rest = [c async for c in chunks]
    assert "".join(c.delta for c in [first, *rest]).split() == [str(i) for i in range(1, 31)]
    assert rest[-1].finish_reason == ipb.FINISH_REASON_LENGTH
    await asyncio.wait_for(node.servicer.wait_idle(), 2)
    assert (
        node.value("xllm_requests_total", door="grpc", route="chat", model="", code="no_capable_nodes") == 1
    )
    assert node.value("xllm_requests_total", door="grpc", route="chat", model="counter", code="ok") == 1


async def test_an_embedding_and_a_speech_stream_are_answered_and_counted_like_a_chat(node: Node) -> None:
    embedded = await node.stub.Embed(ipb.EmbedRequest(model="every", input=["ab", "abc"]))
    assert [list(e.values) for e in embedded.data] == [[2.0], [3.0]]
    assert (embedded.model, embedded.node_id, embedded.usage.prompt_tokens) == ("every", "node-test", 2)
    spoken = [c async for c in node.stub.Speak(ipb.SpeakRequest(model="every", input="one two three"))]
    assert [(c.data, c.last) for c in spoken] == [(b"one", False), (b"two", False), (b"three", True)]

    for route in ("embed", "speak"):
        labels = {"door": "grpc", "route": route, "model": "every", "code": "ok"}
        assert node.value("xllm_requests_total", **labels) == 1
        assert node.value("xllm_request_seconds_count", door="grpc", route=route) == 1
    assert node.value("xllm_time_to_first_token_seconds_count", route="speak") == 1
    assert node.value("xllm_time_to_first_token_seconds_count", route="embed") == 0  # not a stream
    assert node.value("xllm_tokens_total", model="every", kind="prompt") == 2
    # Only text prompts can come from a kept prefix: an embedding's are not split by source, a chat's are.
    assert node.value("xllm_prompt_tokens_total", model="every", source="computed") == 0
    [c async for c in node.stub.Chat(chat(1, model="every"))]
    assert node.value("xllm_prompt_tokens_total", model="every", source="computed") == 1
    assert node.servicer.in_flight == 0


async def test_a_unary_call_on_a_draining_node_is_refused_and_counted(node: Node) -> None:
    node.draining[0] = True
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await node.stub.Embed(ipb.EmbedRequest(model="every", input=["x"]))
    assert error_from_rpc(refused.value).code is ErrorCode.NO_CAPABLE_NODES
    labels = {"door": "grpc", "route": "embed", "model": "", "code": "no_capable_nodes"}
    assert node.value("xllm_requests_total", **labels) == 1
    assert node.pool.states() == {}  # refused before the model was even looked up


class PeerSource(MemorySource):
    name = "peer:node-7"


async def test_downloads_count_their_bytes_by_source_kind_and_their_outcomes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1024
    good = ManifestFile("a.gguf", FileFormat.GGUF, len(data), hashlib.sha256(data).hexdigest())
    bad = ManifestFile("b.gguf", FileFormat.GGUF, len(data), "0" * 64)
    model = Model(
        "acme/m", "acme/m", ModelSource.HF, "acme/m", "abc", "http://127.0.0.1:9", files=[good, bad]
    )
    metrics = NodeMetrics(dict)
    with ThreadPoolExecutor(max_workers=2) as io:
        downloader = Downloader(Storage(tmp_path / "models", io), node_config(tmp_path), metrics=metrics)
        await downloader.fetch(model, good, [PeerSource(data)])
        with pytest.raises(LlmlbError) as failed:
            await downloader.fetch(model, bad, [PeerSource(data)])
    assert failed.value.code is ErrorCode.DOWNLOAD_FAILED

    assert metrics.registry.get_sample_value("xllm_download_bytes_total", {"source": "peer"}) == 2 * len(data)
    assert metrics.registry.get_sample_value("xllm_downloads_total", {"outcome": "ok"}) == 1
    assert metrics.registry.get_sample_value("xllm_downloads_total", {"outcome": "download_failed"}) == 1
