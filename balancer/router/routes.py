"""The table of routes: for each inference call, its capability, how to call a node, and converters.

A route is data, not code: the router has one unary path and one streaming path, and each public call
is a line naming its route. ``WHOLE`` routes read a node's stream to its end on the node's side, so
the whole call can be retried elsewhere, and answer with the list of items.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from common import inference_pb as conv
from common.inference import (
    AudioChunk,
    ChatRequest,
    CompleteRequest,
    EmbedRequest,
    EmbedResponse,
    GenerateImageRequest,
    GenerateImageResponse,
    SpeakRequest,
    TextChunk,
    TranscribeRequest,
    Transcript,
)
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.types import Capability

Metadata = tuple[tuple[str, str], ...]
Q = TypeVar("Q")  # the internal request type
T = TypeVar("T")  # the internal answer type (of one item, for a stream)


class CallKind(enum.Enum):
    UNARY = "unary"  # one answer
    STREAM = "stream"  # items passed on as they come; retried elsewhere only before the first
    WHOLE = "whole"  # a stream read to its end, then answered at once; retried like a unary call


@dataclass(frozen=True, slots=True)
class Route(Generic[Q, T]):
    """One inference call as the router carries it to a node."""

    name: str  # in logs and the retry metric
    capability: Capability
    kind: CallKind
    # Starts the call on a node: (stub, request message, seconds left, metadata: the trace context)
    # -> an awaitable or a stream.
    call: Callable[[igrpc.InferenceStub, Any, float, Metadata], Any]
    to_pb: Callable[[Q], Any]
    from_pb: Callable[[Any], T]  # the node's answer (one item, for STREAM) to the internal type


async def _read_all(stream: Any) -> list[Any]:  # a node's stream, read to its end
    return [message async for message in stream]


def _text_chunks_from_pb(messages: list[ipb.TextChunk]) -> list[TextChunk]:
    return [conv.text_chunk_from_pb(m) for m in messages]


CHAT: Route[ChatRequest, TextChunk] = Route(
    "chat",
    Capability.CHAT,
    CallKind.STREAM,
    lambda stub, pb, t, md: stub.Chat(pb, timeout=t, metadata=md),
    conv.chat_request_to_pb,
    conv.text_chunk_from_pb,
)
COMPLETE: Route[CompleteRequest, TextChunk] = Route(
    "complete",
    Capability.COMPLETION,
    CallKind.STREAM,
    lambda stub, pb, t, md: stub.Complete(pb, timeout=t, metadata=md),
    conv.complete_request_to_pb,
    conv.text_chunk_from_pb,
)
CHAT_WHOLE: Route[ChatRequest, list[TextChunk]] = Route(
    "chat",
    Capability.CHAT,
    CallKind.WHOLE,
    lambda stub, pb, t, md: _read_all(stub.Chat(pb, timeout=t, metadata=md)),
    conv.chat_request_to_pb,
    _text_chunks_from_pb,
)
COMPLETE_WHOLE: Route[CompleteRequest, list[TextChunk]] = Route(
    "complete",
    Capability.COMPLETION,
    CallKind.WHOLE,
    lambda stub, pb, t, md: _read_all(stub.Complete(pb, timeout=t, metadata=md)),
    conv.complete_request_to_pb,
    _text_chunks_from_pb,
)
EMBED: Route[EmbedRequest, EmbedResponse] = Route(
    "embed",
    Capability.EMBEDDING,
    CallKind.UNARY,
    lambda stub, pb, t, md: stub.Embed(pb, timeout=t, metadata=md),
    conv.embed_request_to_pb,
    conv.embed_response_from_pb,
)
TRANSCRIBE: Route[TranscribeRequest, Transcript] = Route(
    "transcribe",
    Capability.TRANSCRIPTION,
    CallKind.UNARY,
    lambda stub, pb, t, md: stub.Transcribe(pb, timeout=t, metadata=md),
    conv.transcribe_request_to_pb,
    conv.transcript_from_pb,
)
SPEAK: Route[SpeakRequest, AudioChunk] = Route(
    "speak",
    Capability.SPEECH,
    CallKind.STREAM,
    lambda stub, pb, t, md: stub.Speak(pb, timeout=t, metadata=md),
    conv.speak_request_to_pb,
    conv.audio_chunk_from_pb,
)
IMAGE: Route[GenerateImageRequest, GenerateImageResponse] = Route(
    "image",
    Capability.IMAGE,
    CallKind.UNARY,
    lambda stub, pb, t, md: stub.GenerateImage(pb, timeout=t, metadata=md),
    conv.image_request_to_pb,
    conv.image_response_from_pb,
)

ROUTES: tuple[Route[Any, Any], ...] = (
    CHAT,
    COMPLETE,
    CHAT_WHOLE,
    COMPLETE_WHOLE,
    EMBED,
    TRANSCRIBE,
    SPEAK,
    IMAGE,
)
