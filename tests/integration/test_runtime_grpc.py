"""The node's Inference service on a real gRPC server on 127.0.0.1, with the real models behind it."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest

from common import inference_pb as conv
from common.errors import ErrorCode, LlmlbError
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import CHANNEL_OPTIONS, SERVER_OPTIONS, error_from_rpc
from common.types import Backend
from devkit.model_files import ModelFiles
from node.hardware import Hardware
from node.pool import ModelPool, PoolSettings
from node.servicers.inference import NodeInferenceServicer
from tests.fixtures.eventually import eventually_async
from tests.fixtures.models import SENTENCE, assert_heard

pytestmark = pytest.mark.slow
CPU = Hardware(backend=Backend.CPU, backends=(Backend.CPU,), cpu_count=2, memory_total_mb=16384)


@dataclass
class Node:
    pool: ModelPool
    stub: Any  # an aio stub; grpc-stubs types stubs as synchronous


@pytest.fixture
def models(gemma: ModelFiles, whisper: ModelFiles, piper: ModelFiles) -> dict[str, ModelFiles]:
    return {m.model.id: m for m in (gemma, whisper, piper)}


@pytest.fixture
def start_node(models: dict[str, ModelFiles]) -> Callable[..., AsyncIterator[Node]]:
    async def resolve(model_id: str) -> ModelFiles:
        if model_id not in models:
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} is not registered")
        return models[model_id]

    async def start(**settings: int) -> AsyncIterator[Node]:
        pool = ModelPool(CPU, PoolSettings(**settings))  # type: ignore[arg-type]
        server = grpc.aio.server(options=SERVER_OPTIONS)
        igrpc.add_InferenceServicer_to_server(
            NodeInferenceServicer(pool, resolve, lambda: "node-test"), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        try:
            yield Node(pool, igrpc.InferenceStub(channel))
        finally:
            await channel.close(grace=None)
            await server.stop(grace=None)
            await pool.close()

    return start


def chat_request(content: str, max_tokens: int) -> ipb.ChatRequest:
    return ipb.ChatRequest(
        model="gemma-3-270m",
        messages=[ipb.ChatMessage(role="user", content=content)],
        params=ipb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


async def read_chat(stub: Any, content: str, max_tokens: int) -> list[ipb.TextChunk]:
    return [chunk async for chunk in stub.Chat(chat_request(content, max_tokens))]


def no_request_running(pool: ModelPool) -> bool:
    return sum(s.active for s in pool.details()) == 0


async def test_chat_streams_over_grpc_with_ids_usage_and_finish_reason(start_node) -> None:  # type: ignore[no-untyped-def]
    async for node in start_node():
        chunks = await read_chat(node.stub, "Say hello.", 6)
        assert len(chunks) >= 3
        assert {c.node_id for c in chunks} == {"node-test"} and {c.model for c in chunks} == {"gemma-3-270m"}
        assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id
        assert chunks[-1].finish_reason in (ipb.FINISH_REASON_LENGTH, ipb.FINISH_REASON_STOP)
        assert chunks[-1].usage.completion_tokens <= 6 and chunks[-1].usage.total_tokens > 6
        assert all(c.finish_reason == ipb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        assert node.pool.states() == {"gemma-3-270m": "ready"}


async def test_two_concurrent_chats_both_complete(start_node) -> None:  # type: ignore[no-untyped-def]
    async for node in start_node(slots_per_model=1):
        first, second = await asyncio.gather(
            read_chat(node.stub, "Name a fruit.", 8), read_chat(node.stub, "Name a city.", 8)
        )
        for chunks in (first, second):
            assert chunks[-1].finish_reason != ipb.FINISH_REASON_UNSPECIFIED
            assert chunks[-1].usage.completion_tokens > 0
        assert first[0].request_id != second[0].request_id


async def test_two_slots_serve_two_chats_at_once(start_node) -> None:  # type: ignore[no-untyped-def]
    async for node in start_node(slots_per_model=2):
        results = await asyncio.gather(*(read_chat(node.stub, f"Count to {n}.", 8) for n in (3, 5, 7)))
        assert all(r[-1].usage.completion_tokens > 0 for r in results)


async def test_a_client_that_disconnects_mid_stream_frees_its_slot(start_node) -> None:  # type: ignore[no-untyped-def]
    async for node in start_node(slots_per_model=1):
        call = node.stub.Chat(chat_request("Write a very long story about the sea.", 2000))
        received = 0
        async for _ in call:
            received += 1
            if received == 3:
                break
        call.cancel()
        cancelled = time.monotonic()

        slot_free = functools.partial(no_request_running, node.pool)
        await eventually_async(slot_free, 2.0, "the cancelled request's slot free", every=0.01)
        assert time.monotonic() - cancelled < 1.0
        # The only slot serves the next client straight away, not after 2000 tokens.
        started = time.monotonic()
        chunks = await read_chat(node.stub, "Hi.", 4)
        assert chunks[-1].usage.completion_tokens > 0
        assert time.monotonic() - started < 10


async def test_unknown_model_is_not_found(start_node) -> None:  # type: ignore[no-untyped-def]
    async for node in start_node():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await node.stub.Embed(ipb.EmbedRequest(model="nope", input=["x"]))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert error_from_rpc(caught.value).code is ErrorCode.MODEL_NOT_FOUND


async def test_a_model_lacking_the_capability_is_not_found_with_a_reason(start_node) -> None:  # type: ignore[no-untyped-def]
    async for node in start_node():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [
                c
                async for c in node.stub.Chat(
                    ipb.ChatRequest(
                        model="whisper-base", messages=[ipb.ChatMessage(role="user", content="hi")]
                    )
                )
            ]
        error = error_from_rpc(caught.value)
        assert error.code is ErrorCode.MODEL_NOT_FOUND
        assert "does not support chat" in error.message and "transcription" in error.message
        assert node.pool.states() == {}  # nothing was loaded for it


async def test_embeddings_over_grpc(start_node) -> None:  # type: ignore[no-untyped-def]
    async for node in start_node():
        response = await node.stub.Embed(
            ipb.EmbedRequest(model="gemma-3-270m", input=["a", "b c"], dimensions=32)
        )
        parsed = conv.embed_response_from_pb(response)
        assert [len(v) for v in parsed.data] == [32, 32]
        assert parsed.usage.prompt_tokens >= 3 and parsed.node_id == "node-test"


async def test_speak_then_transcribe_over_grpc_round_trips(start_node) -> None:  # type: ignore[no-untyped-def]
    async for node in start_node():
        chunks = [
            c async for c in node.stub.Speak(ipb.SpeakRequest(model="piper-en-us-joe-medium", input=SENTENCE))
        ]
        assert chunks[-1].last and chunks[0].data.startswith(b"RIFF")
        assert {c.sample_rate for c in chunks} == {22050}
        wav = b"".join(c.data for c in chunks)
        response = await node.stub.Transcribe(
            ipb.TranscribeRequest(model="whisper-base", audio=wav, filename="speech.wav")
        )
        assert_heard(response.text, SENTENCE)  # Piper's voice varies a little from run to run
        assert response.language == "en" and response.segments and response.node_id == "node-test"


async def test_non_audio_upload_is_invalid_argument(start_node) -> None:  # type: ignore[no-untyped-def]
    async for node in start_node():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await node.stub.Transcribe(ipb.TranscribeRequest(model="whisper-base", audio=b"not audio" * 50))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error_from_rpc(caught.value).code is ErrorCode.INVALID_REQUEST


async def test_loading_past_the_memory_budget_evicts_the_least_recently_used(start_node) -> None:  # type: ignore[no-untyped-def]
    # By their estimates piper needs ~170 MB and gemma ~520 MB (weights, chat and embedding contexts),
    # without the prompt prefixes a llama.cpp model may keep (XLLM_PREFIX_CACHE_MB, counted in its memory),
    # with one slot: each further batched slot adds its KV cache (four by default come to ~1.2 GB).
    async for node in start_node(memory_budget_mb=600, prefix_cache_mb=0, slots_per_model=1):
        [c async for c in node.stub.Speak(ipb.SpeakRequest(model="piper-en-us-joe-medium", input="Hi."))]
        assert node.pool.states() == {"piper-en-us-joe-medium": "ready"}
        await node.stub.Embed(ipb.EmbedRequest(model="gemma-3-270m", input=["x"]))
        assert node.pool.states() == {"gemma-3-270m": "ready"}
        assert node.pool.used_mb <= 600
        await node.pool.unload("gemma-3-270m")
        assert node.pool.states() == {} and node.pool.used_mb == 0
