"""The inference plane: the one path every inference request takes, whichever door it came through.

Built once per balancer (``balancer.parts``), it owns admission, the callers' limits, the observer and
its sinks (metrics, usage, history, access log, traces) and the router. A door only parses and
encodes: it opens an ``Exchange`` for a ``Kind`` of call, parses the request inside it (so a refusal is
counted like any other outcome), and asks the exchange for a ``unary``, ``whole`` or ``stream``
answer. A stream comes back as one ``Stream`` that records its first token, tokens, outcome and
cancellation itself, however the door consumes it; a caller going away reaches it as cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import structlog
from opentelemetry.context import Context

from balancer.edge.labels import Labels
from balancer.edge.limits import Headers, KeyLimiter
from balancer.edge.observe import OK, ObservedCall, Observer, Sink
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
M = TypeVar("M")  # a request as its door received it
Timeout = float | None


class Watch(Protocol):
    """How a door makes work stop when its caller goes away (the HTTP door watches for a disconnect)."""

    def __call__(self, work: Awaitable[X]) -> Awaitable[X]: ...


def _as_is(work: Awaitable[X]) -> Awaitable[X]:  # gRPC: a caller going away cancels the handler itself
    return work


def _no_deadline() -> Timeout:
    return None


@dataclass(frozen=True, slots=True)
class Door:
    """What a door says of one request: its name, the caller's trace context, its deadline."""

    name: str  # "http" or "grpc": the metrics' door label
    parent: Context | None = None  # the trace context the caller sent
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

    def open(self, kind: Kind[R, T], door: Door) -> Exchange[R, T]:
        """A new request of ``kind`` through ``door``; use it as ``async with``."""
        call = self.observer.call(door.name, kind.route, door.parent, method=door.method)
        return Exchange(self, kind, door, call)

    async def unary(self, kind: Kind[R, T], door: Door, parse: Callable[[M], R], message: M) -> T:
        """The answer to ``parse(message)``, for a door that needs nothing else of the request."""
        async with self.open(kind, door) as exchange:
            return await exchange.unary(parse(message))

    async def stream(
        self, kind: Kind[R, T], door: Door, parse: Callable[[M], R], message: M
    ) -> AsyncGenerator[T, None]:
        """The items answering ``parse(message)``, for a door that needs nothing else of the request."""
        async with self.open(kind, door) as exchange:
            items = await exchange.stream(parse(message))
        async with aclosing(items):
            async for item in items:
                yield item


class Exchange(Generic[R, T]):
    """One request through the plane, from its door's parsing to its answer's end.

    Leaving the ``async with`` block records the outcome: an exception is the request's error (a
    stream already handed out is closed), a normal exit is ``ok`` unless a stream was handed out,
    which then records its own outcome when it ends.
    """

    def __init__(self, plane: InferencePlane, kind: Kind[R, T], door: Door, call: ObservedCall) -> None:
        self._plane = plane
        self._kind = kind
        self._door = door
        self.call = call
        self.request_id = ""  # the admitted request's (admission gives one to a request that came without)
        self._stream: Stream[T] | None = None

    @property
    def model(self) -> str:
        """The admitted request's model id, in normal form."""
        return self.call.model

    @property
    def headers(self) -> Headers:
        """The caller's rate-limit headers (none for a key without limits), for its answer."""
        return self.call.headers

    async def __aenter__(self) -> Exchange[R, T]:
        self._current = tracing.current(self.call.span)  # the request's span, while the door's task runs it
        self._current.__enter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._current.__exit__(kind, exc, tb)
        if exc is not None:
            if self._stream is not None:
                await self._stream.close(exc)
            await self._plane.observer.failed(self.call, exc)
        elif self._stream is None:
            self.call.done(OK)

    async def _admitted(self, request: R) -> tuple[R, Timeout]:
        admitted = await self._plane.observer.admit(self.call, request)
        self.request_id = admitted.request_id
        if self.call.headers and self._door.limited is not None:
            self._door.limited(self.call.headers)
        return admitted, self._door.deadline()

    async def unary(self, request: R) -> T:
        """The answer of a unary kind."""
        assert self._kind.unary is not None, f"{self._kind.route} has no unary call"
        request, timeout = await self._admitted(request)
        result = await self._door.watch(self._kind.unary(self._plane.router, request, timeout))
        usage, _ = _usage(result)
        if usage is not None:
            self.call.tokens(usage)
        return result

    async def whole(self, request: R) -> list[T]:
        """A streamed kind's answer, all at once (retried elsewhere if a node fails before its end)."""
        assert self._kind.whole is not None, f"{self._kind.route} has no whole call"
        request, timeout = await self._admitted(request)
        items = await self._door.watch(self._kind.whole(self._plane.router, request, timeout))
        # The usage is on the stream's last item (the last that has one, to be lenient).
        usage = next((u for u, _ in map(_usage, reversed(items)) if u is not None), None)
        if usage is not None:
            self.call.tokens(usage, _usage(items[-1])[1])
        return items

    async def stream(self, request: R) -> Stream[T]:
        """A streamed kind's answer as it comes; returns once its first item is here (or it ended).

        An error before the first item is raised here, so the door can still answer it as a plain error.
        """
        assert self._kind.stream is not None, f"{self._kind.route} has no stream call"
        request, timeout = await self._admitted(request)
        items = self._kind.stream(self._plane.router, request, timeout)
        try:
            first = await self._door.watch(anext(items, None))
        except BaseException:
            await _close(items)
            raise
        self.call.first_chunk()
        self._stream = Stream(self._plane.observer, self.call, first, items)
        return self._stream


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
    "Door",
    "Exchange",
    "InferencePlane",
    "Kind",
    "Stream",
]
