"""The balancer's gRPC ``Inference`` door: protobuf in, the inference plane, protobuf out.

Admission, limits, metrics, routing and the request's span are the plane's (``balancer.edge.plane``),
shared with the HTTP door; this servicer only converts, and tells the plane the caller's trace context,
its deadline (``balancer.edge.deadline``: it travels to the node) and where a limited key's rate-limit
headers go (trailing metadata, with the status). A caller that goes away cancels the node's work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc.aio

from balancer.edge.deadline import time_left
from balancer.edge.plane import CHAT, COMPLETE, EMBED, IMAGE, SPEAK, TRANSCRIBE, Door, InferencePlane
from common import inference_pb as conv
from common import tracing
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]


def _door(context: Context) -> Door:
    return Door(
        "grpc",
        tracing.from_metadata(context.invocation_metadata),
        deadline=lambda: time_left(context.time_remaining()),
        limited=context.set_trailing_metadata,
    )


class RoutedInferenceServicer(igrpc.InferenceServicer):
    """Each call: its request converted, answered by ``plane`` (routed to a node), its answer converted."""

    def __init__(self, plane: InferencePlane) -> None:
        self._plane = plane

    @rpc_errors
    async def Chat(self, request: ipb.ChatRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        async with aclosing(
            self._plane.stream(CHAT, _door(context), conv.chat_request_from_pb, request)
        ) as items:
            async for chunk in items:
                yield conv.text_chunk_to_pb(chunk)

    @rpc_errors
    async def Complete(self, request: ipb.CompleteRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        async with aclosing(
            self._plane.stream(COMPLETE, _door(context), conv.complete_request_from_pb, request)
        ) as items:
            async for chunk in items:
                yield conv.text_chunk_to_pb(chunk)

    @rpc_errors
    async def Speak(self, request: ipb.SpeakRequest, context: Context) -> AsyncIterator[ipb.AudioChunk]:
        async with aclosing(
            self._plane.stream(SPEAK, _door(context), conv.speak_request_from_pb, request)
        ) as items:
            async for chunk in items:
                yield conv.audio_chunk_to_pb(chunk)

    @rpc_errors
    async def Embed(self, request: ipb.EmbedRequest, context: Context) -> ipb.EmbedResponse:
        answer = await self._plane.unary(EMBED, _door(context), conv.embed_request_from_pb, request)
        return conv.embed_response_to_pb(answer)

    @rpc_errors
    async def Transcribe(self, request: ipb.TranscribeRequest, context: Context) -> ipb.TranscribeResponse:
        answer = await self._plane.unary(TRANSCRIBE, _door(context), conv.transcribe_request_from_pb, request)
        return conv.transcript_to_pb(answer)

    @rpc_errors
    async def GenerateImage(
        self, request: ipb.GenerateImageRequest, context: Context
    ) -> ipb.GenerateImageResponse:
        answer = await self._plane.unary(IMAGE, _door(context), conv.image_request_from_pb, request)
        return conv.image_response_to_pb(answer)
