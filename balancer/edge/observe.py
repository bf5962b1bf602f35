"""The metrics of one request, the same on both doors: outcome, latency, first token, tokens.

When a request ends, its ``ObservedCall`` is also handed to the observer's sinks: the usage counter
(per API key and model, ``balancer.usage``) and the console's short history (``balancer.history``).
Both only update memory, so the request path gains no I/O.

A model name becomes a Prometheus label only once the catalogue knows it, and a node id only once it
is registered (``balancer.edge.labels``): callers asking for made-up models, and nodes answering
under made-up ids, add no series (they are counted under the empty label).

Each ``ObservedCall`` is also the request's span (``common.tracing``; a no-op one while tracing is
off), child of the caller's ``traceparent``: admission, the router's choice and each node call are its
children.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from opentelemetry.trace import INVALID_SPAN, Span

from balancer.edge.admission import admit
from balancer.edge.caller import caller
from balancer.edge.labels import Labels
from balancer.edge.limits import Headers, KeyLimiter, KeyState
from common import tracing
from common.errors import ErrorCode, LlmlbError
from common.inference import InferenceRequest, Usage
from common.metrics import BalancerMetrics

R = TypeVar("R", bound=InferenceRequest)
C = TypeVar("C")
OK = "ok"


@dataclass(frozen=True, slots=True)
class Asked(Generic[R, C]):
    """A request as its door parsed it: what the plane answers, whether the caller asked for the answer
    as it comes (``stream``: a streamed kind's items, else all of them at once), and what the door keeps
    for encoding its answer (``keep``: e.g. a response format)."""

    request: R
    stream: bool
    keep: C


class Sink(Protocol):
    """Told of every request when it ends; must not block or await (it runs on the request path)."""

    def finished(self, call: ObservedCall, code: str, elapsed_s: float) -> None: ...


@dataclass(slots=True)
class ObservedCall:
    """One request being answered; ``done`` records it once, whichever way it ends."""

    metrics: BalancerMetrics
    labels: Labels
    door: str
    route: str
    model: str = ""  # the admitted (normal) model id; cleared before counting if the catalogue lacks it
    key_id: str = ""  # the caller's API key ("" with auth off)
    method: str = ""  # what the caller asked for on its door, e.g. "POST /v1/chat/completions" (HTTP)
    sinks: tuple[Sink, ...] = ()
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False
    node_id: str = ""  # the registered node that answered, when the answer names one
    first_token_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    span: Span = INVALID_SPAN  # the request's span; a no-op one while tracing is off
    limited: KeyState | None = None  # the caller's limits hold a slot for this request until it ends
    headers: Headers = ()  # the caller's rate-limit headers, for every answer to it

    def first_chunk(self) -> None:
        self.first_token_s = time.perf_counter() - self.started
        self.metrics.first_token(self.route, self.first_token_s)

    def tokens(self, usage: Usage, node_id: str = "") -> None:
        """Counts tokens of an answer; only answered requests get here, so their model is known.

        With ``node_id`` (a chat or completion answer) its prompt tokens are counted on that node too,
        split into those the node's prompt cache saved and those it computed; an id the answer gives
        that no registered node has is counted under the empty label.
        """
        self.metrics.tokens(self.model, usage.prompt_tokens, usage.completion_tokens)
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        if node_id:
            self.node_id = self.labels.node(node_id)
            self.metrics.prompt_tokens(self.model, self.node_id, usage.prompt_tokens, usage.cached_tokens)

    def done(self, code: str) -> None:
        """``code`` is ``ok`` or an ``ErrorCode`` value."""
        if not self.finished:
            self.finished = True
            elapsed = time.perf_counter() - self.started
            self.metrics.observe(self.door, self.route, self.model, code, elapsed)
            for sink in self.sinks:
                sink.finished(self, code, elapsed)
            if self.span.is_recording():
                self._traced()
            tracing.finish(self.span, code)

    def _traced(self) -> None:
        """What the request's span says of it: no prompt, no answer, no secret."""
        attributes: dict[str, str | int] = {
            "llmlb.model": self.model,
            "llmlb.key_id": self.key_id,
            "gen_ai.usage.input_tokens": self.prompt_tokens,
            "gen_ai.usage.output_tokens": self.completion_tokens,
        }
        if self.node_id:
            attributes["llmlb.node"] = self.node_id
        self.span.set_attributes(attributes)


class Observer:
    """Opens an ``ObservedCall`` per request and closes it with its outcome; the plane holds the one."""

    def __init__(
        self,
        metrics: BalancerMetrics,
        labels: Labels,
        sinks: tuple[Sink, ...] = (),
        limiter: KeyLimiter | None = None,
    ) -> None:
        self.metrics = metrics
        self._labels = labels
        self._limiter = limiter
        self._sinks = (*sinks, limiter) if limiter is not None else sinks

    async def admit(
        self,
        door: str,
        route: str,
        parse: Callable[[], Awaitable[Asked[R, C]]],
        *,
        method: str = "",
        span: Span = INVALID_SPAN,
        started: float,
    ) -> tuple[ObservedCall, Asked[R, C]]:
        """A new call by the key the door's access check let in: ``parse()`` (the door's own parsing),
        then admission (``edge.admission.admit``) and the caller's limits (``edge.limits``); the admitted
        model is then the call's label.

        ``method`` names the HTTP request for the access log; ``span`` is the request's span
        (``tracing.serving``); ``started`` when the door took the request. A request the door cannot
        parse, or a refusal, is recorded here once (unlabelled, since no model was admitted) and raised.
        """
        key = caller()
        call = ObservedCall(
            self.metrics,
            self._labels,
            door,
            route,
            key_id=key.id if key is not None else "",
            method=method,
            sinks=self._sinks,
            span=span,
            started=started,
        )
        try:
            asked = await parse()
            with tracing.span("admit") as admitting:
                request = admit(asked.request)
                if admitting.is_recording():
                    admitting.set_attributes(
                        {"llmlb.model": request.model, "llmlb.request_id": request.request_id}
                    )
                    span.set_attribute("llmlb.request_id", request.request_id)
                if self._limiter is not None:
                    call.limited, call.headers = await self._limiter.admit(key, request.model)
        except BaseException as exc:
            await self.failed(call, exc)
            raise
        call.model = request.model
        return call, Asked(request, asked.stream, asked.keep)

    async def failed(self, call: ObservedCall, error: BaseException) -> None:
        """Records a refused or failed request; an unknown model name is never a label."""
        if call.finished:
            return
        if isinstance(error, LlmlbError):
            code = error.code.value
            if call.headers and not error.headers:  # a limited key's answers all carry its headers
                error.headers = call.headers
        elif isinstance(error, asyncio.CancelledError | GeneratorExit):  # the caller went away
            code = ErrorCode.CANCELLED.value
        else:
            code = ErrorCode.INTERNAL.value
        call.model = self._labels.model(call.model)
        call.done(code)
