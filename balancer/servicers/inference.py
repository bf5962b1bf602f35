"""The balancer's gRPC ``Inference`` door: protobuf in, ``Router`` call, protobuf out.

The caller's deadline travels to the node; a caller that goes away cancels the node's work.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc.aio

from balancer.router import Router
from common import inference_pb as conv
from common.errors import LlmlbError
from common.metrics import BalancerMetrics
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
DOOR = "grpc"


def _time_left(context: Context) -> float | None:
    left = context.time_remaining()
    return left if left is not None and left > 0 else None


class InferenceServicer(igrpc.InferenceServicer):
    """Routes each call to a node through ``router``; records the door's metrics."""

    def __init__(self, router: Router, metrics: BalancerMetrics) -> None:
        self._router = router
        self._metrics = metrics

    async def _unary(self, route: str, model: str, answer: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        code = "ok"
        try:
            return await answer()
        except LlmlbError as exc:
            code = exc.code.value
            raise
        finally:
            self._metrics.observe(DOOR, route, model, code, time.monotonic() - started)

    async def _stream(self, route: str, model: str, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
        started = time.monotonic()
        code = "ok"
        first = True
        try:
            async with aclosing(items) as stream:  # type: ignore[type-var]
                async for item in stream:
                    if first:
                        self._metrics.first_token(route, time.monotonic() - started)
                        first = False
                    usage = getattr(item, "usage", None)
                    if usage is not None:
                        self._metrics.tokens(model, usage.prompt_tokens, usage.completion_tokens)
                    yield item
        except LlmlbError as exc:
            code = exc.code.value
            raise
        finally:
            self._metrics.observe(DOOR, route, model, code, time.monotonic() - started)

    @rpc_errors
    async def Chat(self, request: ipb.ChatRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        chat = conv.chat_request_from_pb(request)
        async for chunk in self._stream(
            "chat", chat.model, self._router.chat(chat, timeout=_time_left(context))
        ):
            yield conv.text_chunk_to_pb(chunk)

    @rpc_errors
    async def Complete(self, request: ipb.CompleteRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        complete = conv.complete_request_from_pb(request)
        chunks = self._router.complete(complete, timeout=_time_left(context))
        async for chunk in self._stream("complete", complete.model, chunks):
            yield conv.text_chunk_to_pb(chunk)

    @rpc_errors
    async def Embed(self, request: ipb.EmbedRequest, context: Context) -> ipb.EmbedResponse:
        embed = conv.embed_request_from_pb(request)
        response = await self._unary(
            "embed", embed.model, lambda: self._router.embed(embed, timeout=_time_left(context))
        )
        self._metrics.tokens(embed.model, response.usage.prompt_tokens, 0)
        return conv.embed_response_to_pb(response)

    @rpc_errors
    async def Transcribe(self, request: ipb.TranscribeRequest, context: Context) -> ipb.TranscribeResponse:
        transcribe = conv.transcribe_request_from_pb(request)
        transcript = await self._unary(
            "transcribe",
            transcribe.model,
            lambda: self._router.transcribe(transcribe, timeout=_time_left(context)),
        )
        return conv.transcript_to_pb(transcript)

    @rpc_errors
    async def Speak(self, request: ipb.SpeakRequest, context: Context) -> AsyncIterator[ipb.AudioChunk]:
        speak = conv.speak_request_from_pb(request)
        async for chunk in self._stream(
            "speak", speak.model, self._router.speak(speak, timeout=_time_left(context))
        ):
            yield conv.audio_chunk_to_pb(chunk)

    @rpc_errors
    async def GenerateImage(
        self, request: ipb.GenerateImageRequest, context: Context
    ) -> ipb.GenerateImageResponse:
        generate = conv.image_request_from_pb(request)
        response = await self._unary(
            "image",
            generate.model,
            lambda: self._router.generate_images(generate, timeout=_time_left(context)),
        )
        return conv.image_response_to_pb(response)
