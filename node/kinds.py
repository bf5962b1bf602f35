"""The kinds of inference call a node serves, one row each.

A row says what the pool needs to serve the kind (the capability to load the model for, the runtime
protocol that serves it, the call into that runtime) and what the node's accounting needs of its answer
(the metrics route, where its usage is). ``ModelPool.unary`` and ``ModelPool.stream`` serve every row
the same way; the ``Inference`` servicer pairs each RPC with its row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from common.inference import (
    AudioChunk,
    ChatRequest,
    CompleteRequest,
    EmbedRequest,
    EmbedResponse,
    GenerateImageRequest,
    GenerateImageResponse,
    InferenceRequest,
    SpeakRequest,
    TextChunk,
    TranscribeRequest,
    Transcript,
    Usage,
)
from common.types import Capability
from node.runtimes.base import (
    CancelFlag,
    Embedding,
    ImageGeneration,
    Speech,
    TextGeneration,
    Transcription,
)

R = TypeVar("R", bound=InferenceRequest)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Serving:
    """What the pool calls the request it serves, for the answer to carry."""

    model_id: str  # the resolved model's id
    request_id: str  # the request's own, or one the pool made up
    created: int  # unix seconds when the pool took the request

    def stamp(self, chunks: Iterator[TextChunk]) -> Iterator[TextChunk]:
        """Each chunk with the request's id, model and start time."""
        for chunk in chunks:
            yield replace(chunk, request_id=self.request_id, model=self.model_id, created=self.created)


def _no_usage(answer: Any) -> Usage | None:
    return None


@dataclass(frozen=True, slots=True)
class Kind(Generic[R, T]):
    """One kind of inference call on a node.

    ``unary`` or ``stream`` is the call into the runtime, made on a worker thread with the leased runtime
    (an instance of ``runtime``), the request, ``Serving`` and the cancel flag, which the runtime checks
    at its steps. A unary kind's call returns the answer; a streamed kind's returns its items (``T`` is
    one item), and the runtime ends the stream with a final item once it sees the flag.
    """

    route: str  # the node's metrics route and the name of the call's span
    capability: Capability  # what the model is loaded for
    runtime: type[Any]  # the runtime protocol that serves the kind
    unary: Callable[[Any, R, Serving, CancelFlag], T] | None = None
    stream: Callable[[Any, R, Serving, CancelFlag], Iterator[T]] | None = None
    usage: Callable[[T], Usage | None] = _no_usage  # the tokens an answer (or item) accounts for
    prefixed: bool = False  # prompts may come from a kept prefix: cached prompt tokens are counted


def _chat(
    runtime: TextGeneration, request: ChatRequest, serving: Serving, cancel: CancelFlag
) -> Iterator[TextChunk]:
    return serving.stamp(runtime.chat(request, cancel))


def _complete(
    runtime: TextGeneration, request: CompleteRequest, serving: Serving, cancel: CancelFlag
) -> Iterator[TextChunk]:
    return serving.stamp(runtime.complete(request, cancel))


def _chunk_usage(chunk: TextChunk) -> Usage | None:
    return chunk.usage  # on the stream's last chunk


def _embed(runtime: Embedding, request: EmbedRequest, serving: Serving, cancel: CancelFlag) -> EmbedResponse:
    vectors, usage = runtime.embed(request)
    return EmbedResponse(model=serving.model_id, data=tuple(tuple(v) for v in vectors), usage=usage)


def _embed_usage(response: EmbedResponse) -> Usage:
    return response.usage


def _transcribe(
    runtime: Transcription, request: TranscribeRequest, serving: Serving, cancel: CancelFlag
) -> Transcript:
    return runtime.transcribe(request, cancel)


def _speak(
    runtime: Speech, request: SpeakRequest, serving: Serving, cancel: CancelFlag
) -> Iterator[AudioChunk]:
    # For WAV the first chunk is the RIFF header; the last chunk has ``last=True``.
    return runtime.speak(request, cancel)


def _generate_images(
    runtime: ImageGeneration, request: GenerateImageRequest, serving: Serving, cancel: CancelFlag
) -> GenerateImageResponse:
    return GenerateImageResponse(images=tuple(runtime.generate_images(request)))


CHAT: Kind[ChatRequest, TextChunk] = Kind(
    "chat", Capability.CHAT, TextGeneration, stream=_chat, usage=_chunk_usage, prefixed=True
)
COMPLETE: Kind[CompleteRequest, TextChunk] = Kind(
    "complete", Capability.COMPLETION, TextGeneration, stream=_complete, usage=_chunk_usage, prefixed=True
)
EMBED: Kind[EmbedRequest, EmbedResponse] = Kind(
    "embed", Capability.EMBEDDING, Embedding, unary=_embed, usage=_embed_usage
)
TRANSCRIBE: Kind[TranscribeRequest, Transcript] = Kind(
    "transcribe", Capability.TRANSCRIPTION, Transcription, unary=_transcribe
)
SPEAK: Kind[SpeakRequest, AudioChunk] = Kind("speak", Capability.SPEECH, Speech, stream=_speak)
IMAGE: Kind[GenerateImageRequest, GenerateImageResponse] = Kind(
    "image", Capability.IMAGE, ImageGeneration, unary=_generate_images
)

__all__ = ["CHAT", "COMPLETE", "EMBED", "IMAGE", "SPEAK", "TRANSCRIBE", "Kind", "Serving"]
