"""OpenTelemetry traces for both processes: on with the standard ``OTEL_*`` variables, off and free without.

``configure`` runs once when a balancer or node starts serving. With ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, and neither ``OTEL_SDK_DISABLED=true`` nor
``OTEL_TRACES_EXPORTER=none``, it installs the SDK's tracer provider with a batching OTLP exporter; the
SDK reads every other standard variable itself (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_EXPORTER_OTLP_PROTOCOL``, ``..._HEADERS``, ``..._INSECURE``, ``OTEL_TRACES_SAMPLER``,
``OTEL_BSP_*``). The service is ``llmlb`` (balancer) or ``xllm`` (node) unless those name another.
Without them nothing of the SDK is imported: the helpers here hand out one shared no-op span and the
request path only asks ``is_recording()``.

Trace context is W3C's (``traceparent``, and ``tracestate`` up to ``MAX_TRACESTATE`` characters), read
from HTTP headers and gRPC metadata and written into the metadata of each node call; nothing else a
caller sends (no baggage) is passed on. Span attributes name models, nodes, key ids, token counts and
outcomes, never a prompt, an answer or a secret; exceptions are not recorded on spans (their messages
may quote input), only the error code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, NoOpTracer, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from common.config import otlp_protocol, traces_wanted
from common.errors import ErrorCode, LlmlbError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = structlog.get_logger(__name__)

BALANCER_SERVICE = "llmlb"
NODE_SERVICE = "xllm"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
MAX_TRACESTATE = 512  # W3C's advice for what a vendor keeps; longer is dropped, not passed to nodes
OK = "ok"

T = TypeVar("T")

_PROPAGATOR = TraceContextTextMapPropagator()
_NO_SPAN: contextlib.nullcontext[Span] = contextlib.nullcontext(INVALID_SPAN)


class _State:
    tracer: trace.Tracer = NoOpTracer()
    provider: TracerProvider | None = None
    on = False


_state = _State()


def configure(default_service: str, otel: Mapping[str, str]) -> TracerProvider | None:
    """Installs the SDK's provider when ``otel`` asks for traces; None (tracing stays off) otherwise.

    Values from the ``.env`` file are put into the environment first (never over it), so the SDK, which
    reads ``os.environ``, sees the same layered settings as the rest of the configuration.
    """
    if not traces_wanted(otel):
        return None
    for name, value in otel.items():
        os.environ.setdefault(name, value)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(_exporter(otel)))
    install(provider)
    return provider


def _exporter(otel: Mapping[str, str]) -> Any:
    if otlp_protocol(otel) == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter as HttpExporter,
            )
        except ImportError:
            raise ValueError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf needs opentelemetry-exporter-otlp-proto-http;"
                " install it, or use grpc"
            ) from None
        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def install(provider: TracerProvider | None) -> None:
    """Traces go to ``provider`` from now on (None: off). ``configure`` calls it; so do tests."""
    _state.provider = provider
    _state.tracer = provider.get_tracer("llmlb") if provider is not None else NoOpTracer()
    _state.on = provider is not None


def shutdown() -> None:
    """Exports what is still buffered and turns tracing off (blocking: call it from a thread)."""
    provider = _state.provider
    install(None)
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    """Whether spans are being recorded in this process."""
    return _state.on


# -- the context a request brings --------------------------------------------------------------------


def _extract(traceparent: str | None, tracestate: str | None) -> Context | None:
    if not traceparent:
        return None
    carrier = {TRACEPARENT: traceparent}
    if tracestate and len(tracestate) <= MAX_TRACESTATE:
        carrier[TRACESTATE] = tracestate
    return _PROPAGATOR.extract(carrier)


def from_headers(headers: Mapping[str, str]) -> Context | None:
    """The caller's trace context from HTTP headers (None when absent, or when tracing is off)."""
    if not _state.on:
        return None
    return _extract(headers.get(TRACEPARENT), headers.get(TRACESTATE))


def from_metadata(read: Callable[[], Iterable[tuple[str, str | bytes]] | None]) -> Context | None:
    """The caller's trace context from gRPC metadata (``context.invocation_metadata``, read only while
    tracing is on); None when absent, or when tracing is off."""
    if not _state.on:
        return None
    found: dict[str, str] = {}
    for key, value in read() or ():
        if key in (TRACEPARENT, TRACESTATE) and isinstance(value, str):
            found[key] = value
    return _extract(found.get(TRACEPARENT), found.get(TRACESTATE))


def metadata(span: Span) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying ``span`` as the parent of the callee's spans; empty when not recording."""
    if not span.is_recording():
        return ()
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return tuple(carrier.items())


# -- spans ---------------------------------------------------------------------------------------------


def start(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Context | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Span:
    """A started span, child of ``parent`` (default: the current span); end it with ``finish``.

    For spans that outlive one step of a stream, where a ``with`` block cannot hold them current.
    """
    if not _state.on:
        return INVALID_SPAN
    return _state.tracer.start_span(name, parent, kind, attributes)


@contextlib.contextmanager
def serving(
    name: str,
    parent: Callable[[], Context | None],
    attributes: Mapping[str, str | int | float | bool],
) -> Iterator[Span]:
    """A request's server span, current for the ``with`` block, child of the context ``parent()`` reads
    from what the caller sent (read only while tracing is on). The block does not end it: the request's
    outcome does (``finish``), which for a stream comes after the block."""
    if not _state.on:
        yield INVALID_SPAN
        return
    started = _state.tracer.start_span(name, parent(), SpanKind.SERVER, attributes)
    token = otel_context.attach(trace.set_span_in_context(started))
    try:
        yield started
    finally:
        otel_context.detach(token)


def span(name: str, attributes: Mapping[str, str | int | float | bool] | None = None) -> Any:
    """A span current for the ``with`` block it opens, child of the current span, ended with the
    block's outcome (``outcome_of`` its exception: the code only, since a message may quote input)."""
    if not _state.on:
        return _NO_SPAN
    return _current_span_block(name, attributes)


@contextlib.contextmanager
def _current_span_block(
    name: str, attributes: Mapping[str, str | int | float | bool] | None
) -> Iterator[Span]:
    started = _state.tracer.start_span(name, attributes=attributes)
    token = otel_context.attach(trace.set_span_in_context(started))
    outcome = OK
    try:
        yield started
    except BaseException as exc:
        outcome = outcome_of(exc)
        raise
    finally:
        otel_context.detach(token)
        finish(started, outcome)


def outcome_of(exc: BaseException) -> str:
    """The outcome a span records for ``exc``: its error code, ``cancelled`` or ``internal``."""
    if isinstance(exc, LlmlbError):
        return exc.code.value
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return ErrorCode.CANCELLED.value
    return ErrorCode.INTERNAL.value


def current(span: Span) -> Any:
    """Makes ``span`` the current span for the ``with`` block (which does not end it)."""
    if not span.is_recording():
        return _NO_SPAN
    return trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def current_span() -> Span:
    """The current span (a no-op span when none is, or when tracing is off)."""
    return trace.get_current_span() if _state.on else INVALID_SPAN


def finish(span: Span, outcome: str = OK) -> None:
    """Ends ``span`` with ``outcome``: ``ok``, or an error code (``ErrorCode`` value) marking it failed."""
    if not span.is_recording():
        return
    span.set_attribute("llmlb.outcome", outcome)
    if outcome != OK:
        span.set_status(Status(StatusCode.ERROR, outcome))
    span.end()


@overload
def within(span: Span, items: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]: ...
@overload
def within(span: Span, items: AsyncIterator[T]) -> AsyncIterator[T]: ...
def within(span: Span, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """``items``, with ``span`` current while each item is produced (not while the consumer holds it).

    A stream's work runs in whichever task pulls its next item; this makes the spans that work starts
    children of ``span`` without holding the context across a ``yield``. Closing the result closes
    ``items``.
    """
    return _within(span, items) if span.is_recording() else items


async def _within(span: Span, items: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    entered = trace.set_span_in_context(span)
    try:
        while True:
            token = otel_context.attach(entered)
            try:
                item = await anext(items)
            except StopAsyncIteration:
                return
            finally:
                otel_context.detach(token)
            yield item
    finally:
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()


@contextlib.asynccontextmanager
async def exporting(default_service: str, otel: Mapping[str, str]) -> AsyncIterator[None]:
    """Traces on for the block when ``otel`` asks for them (``configure``); what is buffered is
    exported when it ends."""
    provider = configure(default_service, otel)
    if provider is not None:
        log.info(
            "tracing.exporting",
            service=provider.resource.attributes.get("service.name", default_service),
            protocol=otlp_protocol(otel),
        )
    try:
        yield
    finally:
        if provider is not None:
            await asyncio.to_thread(shutdown)
