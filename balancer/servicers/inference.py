"""The balancer's gRPC ``Inference`` door: protobuf in, the inference plane (``balancer.edge.plane``:
admission, limits, metrics, routing, the span), protobuf out. The door gives the plane the caller's trace
context, its deadline and where a limited key's rate-limit headers go (trailing metadata)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc.aio

from balancer.edge.deadline import time_left
from balancer.edge.plane import CHAT, COMPLETE, EMBED, IMAGE, SPEAK, TRANSCRIBE, Door, InferencePlane, Kind
from common import inference_pb as conv
from common import tracing
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]
Convert = Callable[[Any], Any]  # protobuf to the plane's types, or back


def _door(context: Context) -> Door:
    return Door(
        "grpc",
        tracing.from_metadata(context.invocation_metadata),
        deadline=lambda: time_left(context.time_remaining()),
        limited=context.set_trailing_metadata,
    )


def _streamed(name: str, kind: Kind[Any, Any], parse: Convert, encode: Convert) -> Any:
    """The servicer method ``name``: a stream of ``kind`` through the plane, each item encoded."""

    async def method(self: RoutedInferenceServicer, request: Any, context: Context) -> AsyncIterator[Any]:
        async with aclosing(self.plane.stream(kind, _door(context), parse, request)) as items:
            async for item in items:
                yield encode(item)

    method.__name__ = name
    return rpc_errors(method)


def _unary(name: str, kind: Kind[Any, Any], parse: Convert, encode: Convert) -> Any:
    """The servicer method ``name``: one call of ``kind`` through the plane, its answer encoded."""

    async def method(self: RoutedInferenceServicer, request: Any, context: Context) -> Any:
        return encode(await self.plane.unary(kind, _door(context), parse, request))

    method.__name__ = name
    return rpc_errors(method)


class RoutedInferenceServicer(igrpc.InferenceServicer):
    """Each call: its request converted, answered by ``plane`` (routed to a node), its answer converted."""

    def __init__(self, plane: InferencePlane) -> None:
        self.plane = plane

    Chat = _streamed("Chat", CHAT, conv.chat_request_from_pb, conv.text_chunk_to_pb)
    Complete = _streamed("Complete", COMPLETE, conv.complete_request_from_pb, conv.text_chunk_to_pb)
    Speak = _streamed("Speak", SPEAK, conv.speak_request_from_pb, conv.audio_chunk_to_pb)
    Embed = _unary("Embed", EMBED, conv.embed_request_from_pb, conv.embed_response_to_pb)
    Transcribe = _unary("Transcribe", TRANSCRIBE, conv.transcribe_request_from_pb, conv.transcript_to_pb)
    GenerateImage = _unary("GenerateImage", IMAGE, conv.image_request_from_pb, conv.image_response_to_pb)
