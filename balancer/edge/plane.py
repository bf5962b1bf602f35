"""The inference plane: the one path every inference request takes, whichever door it came through.

Built once per balancer (``balancer.parts``), it owns admission, the callers' limits, the observer and
its sinks (metrics, usage, history, access log, traces) and the router. A door only parses and
encodes: it makes one call, ``InferencePlane.answer``, with a ``Kind`` of call, its ``Door``, its
parser and its encoder, and the plane does the rest in order (span, parse, admission and limits, the
router, encode), entering each of its parts once. A stream comes back to the encoder as one ``Stream``
that records its first token, tokens, outcome and cancellation itself, however the door consumes it; a
caller going away reaches it as cancellation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import structlog
from opentelemetry.context import Context

from balancer.edge.labels import Labels
from balancer.edge.limits import Headers, KeyLimiter
from balancer.edge.observe import OK, Asked, ObservedCall, Observer, Sink
from balancer.router import Router
from common import tracing
from common.errors import LlmlbError
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
from common.metrics import BalancerMetrics

log = structlog.get_logger(__name__)
R = TypeVar("R", bound=InferenceRequest)
T = TypeVar("T")
X = TypeVar("X")
C = TypeVar("C")  # what a door keeps from parsing for its answer
Timeout = float | None


class Watch(Protocol):
    """How a door makes work stop when its caller goes away (the HTTP door watches for a disconnect)."""

    def __call__(self, work: Awaitable[X]) -> Awaitable[X]: ...


def _as_is(work: Awaitable[X]) -> Awaitable[X]:  # gRPC: a caller going away cancels the handler itself
    return work


def _no_deadline() -> Timeout:
    return None


def _no_parent() -> Context | None:
    return None


@dataclass(frozen=True, slots=True)
class Door:
    """What a door says of one request: its name, the caller's trace context, its deadline."""

    name: str  # "http" or "grpc": the metrics' door label
    parent: Callable[[], Context | None] = _no_parent  # the trace context the caller sent, read if traced
    method: str = ""  # e.g. "POST /v1/chat/completions", for the access log
    deadline: Callable[[], Timeout] = _no_deadline  # seconds left, read once the request is admitted
    watch: Watch = _as_is
    limited: Callable[[Headers], None] | None = None  # given a limited key's headers once admitted


@dataclass(frozen=True, slots=True)
class Kind(Generic[R, T]):
    """One kind of inference call: its metrics route and the router's calls that answer it.

    For a streamed kind ``T`` is one item and ``whole`` answers with all of them at once; for a unary
    kind ``T`` is the answer.
    """

    route: str
    unary: Callable[[Router, R, Timeout], Awaitable[T]] | None = None
    stream: Callable[[Router, R, Timeout], AsyncIterator[T]] | None = None
    whole: Callable[[Router, R, Timeout], Awaitable[list[T]]] | None = None


def _chat_stream(router: Router, request: ChatRequest, timeout: Timeout) -> AsyncIterator[TextChunk]:
    return router.chat(request, timeout=timeout)


def _chat_whole(router: Router, request: ChatRequest, timeout: Timeout) -> Awaitable[list[TextChunk]]:
    return router.chat_whole(request, timeout=timeout)


CHAT: Kind[ChatRequest, TextChunk] = Kind("chat", stream=_chat_stream, whole=_chat_whole)
RESPONSES: Kind[ChatRequest, TextChunk] = Kind("responses", stream=_chat_stream, whole=_chat_whole)
COMPLETE: Kind[CompleteRequest, TextChunk] = Kind(
    "complete",
    stream=lambda router, r, t: router.complete(r, timeout=t),
    whole=lambda router, r, t: router.complete_whole(r, timeout=t),
)
EMBED: Kind[EmbedRequest, EmbedResponse] = Kind(
    "embed", unary=lambda router, r, t: router.embed(r, timeout=t)
)
TRANSCRIBE: Kind[TranscribeRequest, Transcript] = Kind(
    "transcribe", unary=lambda router, r, t: router.transcribe(r, timeout=t)
)
SPEAK: Kind[SpeakRequest, AudioChunk] = Kind("speak", stream=lambda router, r, t: router.speak(r, timeout=t))
IMAGE: Kind[GenerateImageRequest, GenerateImageResponse] = Kind(
    "image", unary=lambda router, r, t: router.generate_images(r, timeout=t)
)


def _usage(item: Any) -> tuple[Usage | None, str]:
    """The usage an answer or item carries, and the node a text chunk names (its prompt counts there)."""
    if isinstance(item, TextChunk):
        return item.usage, item.node_id
    return getattr(item, "usage", None), ""


@dataclass(frozen=True, slots=True)
class Answer(Generic[R, T, C]):
    """What the plane hands a door's encoder: the admitted request, the caller's rate-limit headers, what
    the door kept from parsing, and the answer: ``items`` (a unary kind's one answer, or a streamed
    kind's items all at once) or ``stream`` (as they come)."""

    request: R  # as admitted: its model id in normal form, its request id given or minted
    headers: Headers  # a limited key's rate-limit headers (none for a key without limits)
    keep: C
    items: list[T]
    stream: Stream[T] | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def one(self) -> T:
        """A unary kind's answer."""
        return self.items[0]


class InferencePlane:
    """Admission, the callers' limits, the observer with its sinks, and the router, for both doors."""

    def __init__(
        self,
        router: Router,
        metrics: BalancerMetrics,
        labels: Labels,
        sinks: tuple[Sink, ...] = (),
        limiter: KeyLimiter | None = None,
    ) -> None:
        self.router = router
        self.observer = Observer(metrics, labels, sinks, limiter)

    async def answer(
        self,
        kind: Kind[R, T],
        door: Door,
        parse: Callable[[], Awaitable[Asked[R, C]]],
        encode: Callable[[Answer[R, T, C]], X],
    ) -> X:
        """One request of ``kind`` through ``door``, start to end: ``parse()`` (the door's parsing,
        counted like any other outcome when it refuses), admission and limits, the router, then
        ``encode`` of the answer, whose result is returned.

        The request is recorded once: an error (here or in ``encode``) is its outcome and closes a
        stream already made; otherwise it is ``ok``, unless the answer is a stream, which records its
        own outcome when it ends. An error before a stream's first item is raised here, so the door
        can still answer it as a plain error.
        """
        started = time.perf_counter()
        attributes = {"llmlb.door": door.name, "llmlb.route": kind.route}
        with tracing.serving(f"{door.name} {kind.route}", door.parent, attributes) as span:
            observer = self.observer
            call, asked = await observer.admit(
                door.name, kind.route, parse, method=door.method, span=span, started=started
            )
            request, stream = asked.request, None
            try:
                if call.headers and door.limited is not None:
                    door.limited(call.headers)
                items: list[T] = []
                if kind.unary is not None:
                    items.append(await door.watch(kind.unary(self.router, request, door.deadline())))
                    _count(call, items)
                elif asked.stream:
                    assert kind.stream is not None, f"{kind.route} has no stream call"
                    stream = await _first(
                        call, observer, door, kind.stream(self.router, request, door.deadline())
                    )
                else:
                    assert kind.whole is not None, f"{kind.route} has no whole call"
                    items = await door.watch(kind.whole(self.router, request, door.deadline()))
                    _count(call, items)
                answer = Answer(request, call.headers, asked.keep, items, stream)
                encoded = encode(answer)
            except BaseException as exc:
                if stream is not None:
                    await stream.close(exc)
                await observer.failed(call, exc)
                raise
            if stream is None:
                call.done(OK)
            return encoded


def _count(call: ObservedCall, items: list[Any]) -> None:
    """Counts the usage of a unary answer, or of a stream's items (on its last item, or the last that
    has one, to be lenient)."""
    usage = next((u for u, _ in map(_usage, reversed(items)) if u is not None), None)
    if usage is not None:
        call.tokens(usage, _usage(items[-1])[1])


async def _first(call: ObservedCall, observer: Observer, door: Door, items: AsyncIterator[T]) -> Stream[T]:
    """The stream of ``items`` once its first item is here (or it ended empty)."""
    try:
        first = await door.watch(anext(items, None))
    except BaseException:
        await _close(items)
        raise
    call.first_chunk()
    return Stream(observer, call, first, items)


async def _close(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


class Stream(Generic[T]):
    """A streamed answer: ``first`` (None for an empty answer), then iterate for every item, ``first``
    included. Counts tokens and records the outcome once: ``ok`` at its end, the error it raised, or
    ``cancelled`` when closed before its end."""

    def __init__(
        self, observer: Observer, call: ObservedCall, first: T | None, rest: AsyncIterator[T]
    ) -> None:
        self.first = first
        self._observer = observer
        self._call = call
        self._rest = rest
        self._items = self._counted()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._items

    async def aclose(self) -> None:
        """Stops the answer (and the node's work behind it); before its end that is a cancellation."""
        await self.close(asyncio.CancelledError())

    async def close(self, error: BaseException) -> None:
        """Stops the answer, recording ``error`` as its outcome unless it has one already."""
        await self._failed(error)  # first: closing the items below would be counted a cancellation
        await self._items.aclose()
        await _close(self._rest)

    async def _counted(self) -> AsyncGenerator[T, None]:
        try:
            async with aclosing(tracing.within(self._call.span, self._rest)) as rest:  # type: ignore[type-var]
                if self.first is not None:
                    self._count(self.first)
                    yield self.first
                async for item in rest:
                    self._count(item)
                    yield item
        except BaseException as exc:
            await self._failed(exc)
            raise
        self._call.done(OK)

    async def _failed(self, exc: BaseException) -> None:
        call = self._call
        if call.finished:
            return
        if isinstance(exc, LlmlbError):
            log.info("edge.stream_failed", route=call.route, code=exc.code.value, error=exc.message)
        elif not isinstance(exc, asyncio.CancelledError | GeneratorExit):
            log.error("edge.stream_failed", route=call.route, error=repr(exc), exc_info=exc)
        await self._observer.failed(call, exc)

    def _count(self, item: T) -> None:
        usage, node_id = _usage(item)
        if usage is not None:
            self._call.tokens(usage, node_id)


__all__ = [
    "CHAT",
    "COMPLETE",
    "EMBED",
    "IMAGE",
    "RESPONSES",
    "SPEAK",
    "TRANSCRIBE",
    "Answer",
    "Asked",
    "Door",
    "InferencePlane",
    "Kind",
    "Stream",
]
