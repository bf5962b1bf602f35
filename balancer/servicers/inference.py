"""The balancer's gRPC ``Inference`` door: protobuf in, the inference plane (``balancer.edge.plane``:
admission, limits, metrics, routing, the span), protobuf out. The door gives the plane the caller's trace
context, its deadline and where a limited key's rate-limit headers go (trailing metadata)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from functools import partial
from operator import attrgetter
from typing import Any

import grpc.aio

from balancer.edge import plane as p
from balancer.edge.deadline import time_left
from common import inference_pb as conv
from common import tracing
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]
Convert = Callable[[Any], Any]  # protobuf to the plane's types, or back


def _door(context: Context) -> p.Door:
    return p.Door(
        "grpc",
        partial(tracing.from_metadata, context.invocation_metadata),
        deadline=lambda: time_left(context.time_remaining()),
        limited=context.set_trailing_metadata,
    )


def _rpc(kind: p.Kind[Any, Any], parse: Convert, encode: Convert, *, streamed: bool = False) -> Any:
    """A servicer method: ``kind`` through the plane, its answer (or each item) encoded; its errors
    are logged under the kind's route."""

    async def asked(request: Any) -> p.Asked[Any, None]:
        return p.Asked(parse(request), streamed, None)

    async def stream(self: RoutedInferenceServicer, request: Any, context: Context) -> AsyncIterator[Any]:
        items = await self.plane.answer(kind, _door(context), partial(asked, request), attrgetter("stream"))
        async with aclosing(items):  # closed early (the caller went away): the plane counts a cancellation
            async for item in items:
                yield encode(item)

    async def unary(self: RoutedInferenceServicer, request: Any, context: Context) -> Any:
        return await self.plane.answer(kind, _door(context), partial(asked, request), lambda a: encode(a.one))

    method = stream if streamed else unary
    method.__name__ = kind.route
    return rpc_errors(method)


class RoutedInferenceServicer(igrpc.InferenceServicer):
    """Each call: its request converted, answered by ``plane`` (routed to a node), its answer converted."""

    def __init__(self, plane: p.InferencePlane) -> None:
        self.plane = plane

    Chat = _rpc(p.CHAT, conv.chat_request_from_pb, conv.text_chunk_to_pb, streamed=True)
    Complete = _rpc(p.COMPLETE, conv.complete_request_from_pb, conv.text_chunk_to_pb, streamed=True)
    Speak = _rpc(p.SPEAK, conv.speak_request_from_pb, conv.audio_chunk_to_pb, streamed=True)
    Embed = _rpc(p.EMBED, conv.embed_request_from_pb, conv.embed_response_to_pb)
    Transcribe = _rpc(p.TRANSCRIBE, conv.transcribe_request_from_pb, conv.transcript_to_pb)
    GenerateImage = _rpc(p.IMAGE, conv.image_request_from_pb, conv.image_response_to_pb)
