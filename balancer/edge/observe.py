"""The metrics of one request, the same on both doors: outcome, latency, first token, tokens.

A model name becomes a Prometheus label only once the catalogue knows it: an answered request's model
was found by the router, and a refused one is looked up before it is counted, so callers asking for
made-up models add no series (they are counted under an empty model label).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from balancer.edge.admission import admit
from common.errors import ErrorCode, LlmlbError
from common.inference import InferenceRequest, TextChunk, Usage
from common.metrics import BalancerMetrics

T = TypeVar("T")
R = TypeVar("R", bound=InferenceRequest)
OK = "ok"


class Catalogue(Protocol):
    async def get(self, model_id: str) -> Any: ...


@dataclass(slots=True)
class Call:
    """One request being answered; ``done`` records it once, whichever way it ends."""

    metrics: BalancerMetrics
    door: str
    route: str
    model: str = ""  # the admitted (normal) model id; cleared before counting if the catalogue lacks it
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False

    def first_chunk(self) -> None:
        self.metrics.first_token(self.route, time.perf_counter() - self.started)

    def tokens(self, usage: Usage, node_id: str = "") -> None:
        """Counts tokens of an answer; only answered requests get here, so their model is known.

        With ``node_id`` (a chat or completion answer) its prompt tokens are counted on that node too,
        split into those the node's prompt cache saved and those it computed.
        """
        self.metrics.tokens(self.model, usage.prompt_tokens, usage.completion_tokens)
        if node_id:
            self.metrics.prompt_tokens(self.model, node_id, usage.prompt_tokens, usage.cached_tokens)

    def done(self, code: str) -> None:
        """``code`` is ``ok`` or an ``ErrorCode`` value."""
        if not self.finished:
            self.finished = True
            self.metrics.observe(self.door, self.route, self.model, code, time.perf_counter() - self.started)


class Observer:
    """Opens a ``Call`` per request and closes it with its outcome; both doors hold one."""

    def __init__(self, metrics: BalancerMetrics, catalogue: Catalogue) -> None:
        self.metrics = metrics
        self._catalogue = catalogue

    def call(self, door: str, route: str) -> Call:
        return Call(self.metrics, door, route)

    def admit(self, call: Call, request: R) -> R:
        """``request`` through admission (``edge.admission.admit``), its model then the call's label.

        A refusal propagates to the door's ``unary``/``stream``/handler wrapper, which counts it once
        (unlabelled, since the model was never admitted).
        """
        request = admit(request)
        call.model = request.model
        return request

    async def failed(self, call: Call, error: BaseException) -> None:
        """Records a refused or failed request; an unknown model name is never a label."""
        if call.finished:
            return
        if isinstance(error, LlmlbError):
            code = error.code.value
        elif isinstance(error, asyncio.CancelledError | GeneratorExit):  # the caller went away
            code = ErrorCode.CANCELLED.value
        else:
            code = ErrorCode.INTERNAL.value
        if call.model and not await self._known(call.model):
            call.model = ""
        call.done(code)

    async def _known(self, model: str) -> bool:
        try:
            await self._catalogue.get(model)
        except LlmlbError:
            return False
        return True

    async def unary(self, call: Call, answer: Callable[[], Awaitable[T]]) -> T:
        """Awaits ``answer`` and records its outcome."""
        try:
            result = await answer()
        except BaseException as exc:
            await self.failed(call, exc)
            raise
        call.done(OK)
        return result

    async def stream(self, call: Call, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """Yields ``items``, recording the first one's delay, tokens carried in usage, and the outcome."""
        first = True
        try:
            async with aclosing(items) as stream:  # type: ignore[type-var]
                async for item in stream:
                    if first:
                        call.first_chunk()
                        first = False
                    if isinstance(item, TextChunk):
                        if item.usage is not None:
                            call.tokens(item.usage, item.node_id)
                    elif (usage := getattr(item, "usage", None)) is not None:
                        call.tokens(usage)
                    yield item
        except BaseException as exc:
            await self.failed(call, exc)
            raise
        call.done(OK)
