"""The balancer's gRPC ``Inference`` door: protobuf in, the edge and the ``Router``, protobuf out.

Admission, metrics and the request's span are the edge's (``balancer.edge``), shared with the HTTP door;
this servicer only converts (and hands the edge the caller's ``traceparent`` metadata). The caller's
deadline (``balancer.edge.deadline``) travels to the node; a caller that goes away cancels the node's work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc.aio

from balancer.edge.deadline import time_left
from balancer.edge.observe import Call, Observer
from balancer.router import Router
from common import inference_pb as conv
from common import tracing
from common.inference import InferenceRequest
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]
DOOR = "grpc"
R = TypeVar("R", bound=InferenceRequest)
T = TypeVar("T")


def _time_left(context: Context) -> float | None:
    return time_left(context.time_remaining())


class InferenceServicer(igrpc.InferenceServicer):
    """Routes each call to a node through ``router``; ``observer`` admits and records it."""

    def __init__(self, router: Router, observer: Observer) -> None:
        self._router = router
        self._observer = observer

    async def _admit(self, call: Call, request: R, context: Context) -> R:
        """``request`` admitted by the edge; a limited key's rate-limit headers go out as trailing
        metadata (with the status: no frame of their own; a refusal carries them in its own trailer)."""
        admitted = await self._observer.admit(call, request)
        if call.headers:
            context.set_trailing_metadata(call.headers)
        return admitted

    async def _unary(
        self,
        route: str,
        context: Context,
        request: Callable[[], R],
        answer: Callable[[R, float | None], Awaitable[T]],
    ) -> T:
        call = self._observer.call(DOOR, route, tracing.from_metadata(context.invocation_metadata))

        async def admitted() -> T:
            result = await answer(await self._admit(call, request(), context), _time_left(context))
            usage = getattr(result, "usage", None)
            if usage is not None:
                call.tokens(usage)
            return result

        return await self._observer.unary(call, admitted)

    def _stream(
        self,
        route: str,
        context: Context,
        request: Callable[[], R],
        answer: Callable[[R, float | None], AsyncIterator[T]],
    ) -> AsyncIterator[T]:
        call = self._observer.call(DOOR, route, tracing.from_metadata(context.invocation_metadata))

        async def admitted() -> AsyncIterator[T]:
            async for item in answer(await self._admit(call, request(), context), _time_left(context)):
                yield item

        return self._observer.stream(call, admitted())

    @rpc_errors
    async def Chat(self, request: ipb.ChatRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        chunks = self._stream(
            "chat",
            context,
            lambda: conv.chat_request_from_pb(request),
            lambda r, t: self._router.chat(r, timeout=t),
        )
        async for chunk in chunks:
            yield conv.text_chunk_to_pb(chunk)

    @rpc_errors
    async def Complete(self, request: ipb.CompleteRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        chunks = self._stream(
            "complete",
            context,
            lambda: conv.complete_request_from_pb(request),
            lambda r, t: self._router.complete(r, timeout=t),
        )
        async for chunk in chunks:
            yield conv.text_chunk_to_pb(chunk)

    @rpc_errors
    async def Embed(self, request: ipb.EmbedRequest, context: Context) -> ipb.EmbedResponse:
        response = await self._unary(
            "embed",
            context,
            lambda: conv.embed_request_from_pb(request),
            lambda r, t: self._router.embed(r, timeout=t),
        )
        return conv.embed_response_to_pb(response)

    @rpc_errors
    async def Transcribe(self, request: ipb.TranscribeRequest, context: Context) -> ipb.TranscribeResponse:
        transcript = await self._unary(
            "transcribe",
            context,
            lambda: conv.transcribe_request_from_pb(request),
            lambda r, t: self._router.transcribe(r, timeout=t),
        )
        return conv.transcript_to_pb(transcript)

    @rpc_errors
    async def Speak(self, request: ipb.SpeakRequest, context: Context) -> AsyncIterator[ipb.AudioChunk]:
        chunks = self._stream(
            "speak",
            context,
            lambda: conv.speak_request_from_pb(request),
            lambda r, t: self._router.speak(r, timeout=t),
        )
        async for chunk in chunks:
            yield conv.audio_chunk_to_pb(chunk)

    @rpc_errors
    async def GenerateImage(
        self, request: ipb.GenerateImageRequest, context: Context
    ) -> ipb.GenerateImageResponse:
        response = await self._unary(
            "image",
            context,
            lambda: conv.image_request_from_pb(request),
            lambda r, t: self._router.generate_images(r, timeout=t),
        )
        return conv.image_response_to_pb(response)
