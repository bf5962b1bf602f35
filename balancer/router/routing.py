"""The Router: picks a node for each inference request and carries the call there, for both doors.

One path for unary calls and one for streams, driven by the route table (``routes``). Each try asks
``candidates`` for the ranked nodes, ``picking`` and the policy for one of them, and ``queue`` for
a place in the queue when all are busy (``shedding`` refuses at once a request that would wait past its
time); ``failover`` says whether a failed call may go to another node, and ``node_stats`` keeps the
latency and cooldown that the next pick reads. No call starts on a node once the request's deadline
has passed.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc.aio
import structlog
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from balancer.catalog import Catalog  # the one place this package names the model catalogue
from balancer.fleet.clients import NodeClients
from balancer.fleet.view import Fleet
from balancer.router.candidates import DOWNLOADABLE, ON_DISK, READY, Candidate, Candidates, Key
from balancer.router.demand import DemandMeter
from balancer.router.deployed import Deployed
from balancer.router.failover import Failure, classify
from balancer.router.node_stats import NodeStats, NodeStatsTable
from balancer.router.picking import capacity, pick
from balancer.router.policy import LOAD, Choice, RouteKey, make_policy
from balancer.router.prefix_index import PrefixIndex
from balancer.router.queue import WaitQueue
from balancer.router.routes import (
    CHAT,
    CHAT_WHOLE,
    COMPLETE,
    COMPLETE_WHOLE,
    EMBED,
    IMAGE,
    SPEAK,
    TRANSCRIBE,
    Route,
)
from balancer.router.shedding import ServiceTimes, at_once, judge
from common import tracing
from common.config import BalancerConfig
from common.errors import ErrorCode, LlmlbError
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
)
from common.metrics import BalancerMetrics
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.prefixes import chat_prefixes, text_prefixes
from common.types import Capability, Model

log = structlog.get_logger(__name__)

NO_NODE_RETRY_AFTER_S = 5.0
TIER_NAMES = {READY: "ready", ON_DISK: "on_disk", DOWNLOADABLE: "downloadable"}  # in route spans


R = TypeVar("R", bound=InferenceRequest)
T = TypeVar("T")
A = TypeVar("A")  # a node's answer as it came: one message, or a list of them


def _stamped(answer: A, node_id: str) -> A:
    """The node's answer naming the node it was routed to: the registered id, never what the node
    wrote in it (that goes into the ``x-llmlb-node`` header, where a CR/LF would break the reply)."""
    messages: Any = answer if isinstance(answer, list) else (answer,)
    for message in messages:
        if "node_id" in message.DESCRIPTOR.fields_by_name:
            message.node_id = node_id
    return answer


class Router:
    """Transport-neutral inference routing: the gRPC servicer and the HTTP shim both call this.

    Requests arrive admitted (``balancer.edge.admission``): model id in normal form, a request id, limits
    checked. The router decides only where they go.

    ``policy`` names the routing policy (``policy.POLICIES``; ``config.routing`` when not given);
    ``rng`` and ``clock`` are the random source and the monotonic clock every routing rule reads, so
    tests can fix both.
    """

    def __init__(
        self,
        config: BalancerConfig,
        catalog: Catalog,
        fleet: Fleet,
        clients: NodeClients,
        metrics: BalancerMetrics | None = None,
        *,
        policy: str | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._fleet = fleet
        self._clients = clients
        self._metrics = metrics
        self._clock = clock
        self._prefixes = PrefixIndex(fleet, clock=clock)
        self._policy = make_policy(
            policy or config.routing, rng if rng is not None else random.Random(), self._prefixes
        )
        self._stats = NodeStatsTable(
            cooldown_failures=config.cooldown_failures,
            cooldown_s=config.cooldown_s,
            clock=clock,
            reported=self._reported_load,
        )
        fleet.on_load(self._stats.reported_now)
        self.deployed = Deployed()  # kept up to date by the scheduler
        self._candidates = Candidates(fleet, self.deployed)
        self._service = ServiceTimes(clock)
        self.demand = DemandMeter(clock)  # read by the scheduler's autoscaler
        self._queue = WaitQueue(
            queue_size=config.queue_size,
            queue_timeout_s=config.queue_timeout_s,
            max_wait_s=config.max_queue_wait_s,
            service=self._service,
            clock=clock,
            serves=self._candidates.serves,
        )

    def _reported_load(self, node_id: str) -> int:
        load = self._fleet.load(node_id)
        return load.active_requests + load.queued_requests if load is not None else 0

    @property
    def waiting(self) -> int:
        """Requests in the queue now."""
        return self._queue.waiting

    def stats(self) -> dict[str, NodeStats]:
        """Per-node outstanding requests, latency average and failures, for status views."""
        return self._stats.snapshot()

    # -- the calls, one route each ------------------------------------------------------------------

    def chat(self, request: ChatRequest, *, timeout: float | None = None) -> AsyncIterator[TextChunk]:
        """Streams a chat answer from the best node; errors before the first chunk are retried elsewhere."""
        return self._stream(CHAT, request, timeout)

    def complete(self, request: CompleteRequest, *, timeout: float | None = None) -> AsyncIterator[TextChunk]:
        """Streams a text completion, like ``chat``."""
        return self._stream(COMPLETE, request, timeout)

    async def chat_whole(self, request: ChatRequest, *, timeout: float | None = None) -> list[TextChunk]:
        """The whole chat answer at once, for callers that did not ask for a stream.

        Nothing reaches the caller before the end, so a node that fails mid-answer is retried elsewhere.
        """
        return await self._unary(CHAT_WHOLE, request, timeout)

    async def complete_whole(
        self, request: CompleteRequest, *, timeout: float | None = None
    ) -> list[TextChunk]:
        """The whole completion at once; retried elsewhere like ``chat_whole``."""
        return await self._unary(COMPLETE_WHOLE, request, timeout)

    async def embed(self, request: EmbedRequest, *, timeout: float | None = None) -> EmbedResponse:
        """Embeddings from the best node; a failed node is retried elsewhere."""
        return await self._unary(EMBED, request, timeout)

    async def transcribe(self, request: TranscribeRequest, *, timeout: float | None = None) -> Transcript:
        """A transcript from the best node; a failed node is retried elsewhere."""
        return await self._unary(TRANSCRIBE, request, timeout)

    def speak(self, request: SpeakRequest, *, timeout: float | None = None) -> AsyncIterator[AudioChunk]:
        """Streams synthesized speech, like ``chat``."""
        return self._stream(SPEAK, request, timeout)

    async def generate_images(
        self, request: GenerateImageRequest, *, timeout: float | None = None
    ) -> GenerateImageResponse:
        """Images from the best node; a failed node is retried elsewhere."""
        return await self._unary(IMAGE, request, timeout)

    # -- carrying a call ---------------------------------------------------------------------------

    async def _unary(self, route: Route[R, T], request: R, timeout: float | None) -> T:
        pb = route.to_pb(request)
        clock = self._clock
        deadline = self._deadline(timeout)
        model = await self._model(request.model, route.capability)
        queue_key = (model.id, route.capability)
        key = route_key(model.id, request)
        tried: set[str] = set()
        last: Failure | None = None
        self.demand.started(model.id)
        try:
            while True:
                node = await self._waited_node(model, route.capability, key, tried, deadline, last)
                started = clock()
                span = _call_span(route, node, len(tried) + 1)
                outcome = ErrorCode.CANCELLED.value  # unless it answers or fails
                try:
                    answer = await route.call(
                        self._stub(node), pb, max(0.001, deadline - started), tracing.metadata(span)
                    )
                    outcome = tracing.OK
                except grpc.aio.AioRpcError as exc:
                    outcome = _failure_outcome(span, exc)
                    last = self._failed(route, model, node, exc, tried)
                    continue
                finally:
                    tracing.finish(span, outcome)
                    self._release(node, model.id)
                took = clock() - started
                self._stats.answered(node.node_id, took)
                self._service.finished(queue_key, took)
                return route.from_pb(_stamped(answer, node.node_id))
        finally:
            self.demand.finished(model.id)

    async def _stream(self, route: Route[R, T], request: R, timeout: float | None) -> AsyncGenerator[T, None]:
        pb = route.to_pb(request)
        from_pb = route.from_pb
        deadline = self._deadline(timeout)
        model = await self._model(request.model, route.capability)
        key = route_key(model.id, request)
        tried: set[str] = set()
        last: Failure | None = None
        self.demand.started(model.id)
        try:
            # Closed with the caller's stream, at once: the node's call stops and its slot is released.
            async with aclosing(
                self._streamed(route, model, key, tried, deadline, last, pb, from_pb)
            ) as items:
                async for item in items:
                    yield item
        finally:
            self.demand.finished(model.id)

    async def _streamed(
        self,
        route: Route[R, T],
        model: Model,
        key: RouteKey | None,
        tried: set[str],
        deadline: float,
        last: Failure | None,
        pb: Any,
        from_pb: Callable[[Any], T],
    ) -> AsyncGenerator[T, None]:
        clock = self._clock
        queue_key = (model.id, route.capability)
        while True:
            node = await self._waited_node(model, route.capability, key, tried, deadline, last)
            started = clock()
            # Ended below, not held current: the stream yields to its caller while the call is open.
            span = _call_span(route, node, len(tried) + 1)
            outcome = ErrorCode.CANCELLED.value  # unless it runs to its end or fails
            stream = route.call(self._stub(node), pb, max(0.001, deadline - started), tracing.metadata(span))
            items = aiter(stream)
            try:
                try:
                    first = await anext(items)
                except StopAsyncIteration:
                    outcome = tracing.OK
                    self._stats.answered(node.node_id, clock() - started)
                    self._service.finished(queue_key, clock() - started)
                    return
                except grpc.aio.AioRpcError as exc:
                    outcome = _failure_outcome(span, exc)
                    last = self._failed(route, model, node, exc, tried)
                    continue
                self._stats.answered(node.node_id, clock() - started)
                yield from_pb(_stamped(first, node.node_id))
                # Past the first item the caller has bytes: a failure now ends the stream, no retry.
                try:
                    async for item in items:
                        yield from_pb(_stamped(item, node.node_id))
                except grpc.aio.AioRpcError as exc:
                    failure = classify(exc)
                    outcome = failure.error.code.value
                    if failure.node_fault:
                        self._stats.faulted(node.node_id)
                    raise failure.error from None
                outcome = tracing.OK
                self._service.finished(queue_key, clock() - started)
                return
            finally:
                tracing.finish(span, outcome)
                stream.cancel()  # a no-op once finished; stops the node when the caller left early
                self._release(node, model.id)

    def _failed(
        self, route: Route[R, T], model: Model, node: Candidate, exc: grpc.aio.AioRpcError, tried: set[str]
    ) -> Failure:
        """Books a failed try; raises the caller's error unless another node may be tried."""
        failure = classify(exc)
        if failure.node_fault:
            self._stats.faulted(node.node_id)
        tried.add(node.node_id)
        if not failure.retry or len(tried) >= self._config.route_attempts:
            raise failure.error from None
        log.info(
            "route.retry",
            route=route.name,
            model_id=model.id,
            node_id=node.node_id,
            error=failure.error.code.value,
            detail=failure.error.message,
        )
        if self._metrics is not None:
            self._metrics.retries.labels(route.name).inc()
        return failure

    def _deadline(self, timeout: float | None) -> float:
        """When the request must be answered by: its caller's ``timeout`` (0: passed), else the default."""
        return self._clock() + (timeout if timeout is not None else self._config.request_timeout_s)

    def _stub(self, node: Candidate) -> igrpc.InferenceStub:
        return self._clients.stub(node.node_id, node.address, self._fleet.credential(node.node_id))

    # -- choosing a node ---------------------------------------------------------------------------

    async def _model(self, model_id: str, capability: Capability) -> Model:
        model = await self._catalog.get(model_id)
        if capability not in model.capabilities:
            raise LlmlbError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {model.id!r} does not support {capability.value}",
            )
        return model

    async def _waited_node(
        self,
        model: Model,
        capability: Capability,
        key: RouteKey | None,
        tried: set[str],
        deadline: float,
        last: Failure | None,
    ) -> Candidate:
        """``_next_node``, with the time the request waited for it counted as the model's demand."""
        since = self.demand.wait_started(model.id)
        try:
            # The choice's span: ``_pick`` says on it which node the policy chose and why.
            with tracing.span("route", self._route_attributes(model)):
                return await self._next_node(model, capability, key, tried, deadline, last)
        finally:
            self.demand.wait_ended(model.id, since)

    async def _next_node(
        self,
        model: Model,
        capability: Capability,
        key: RouteKey | None,
        tried: set[str],
        deadline: float,
        last: Failure | None,
    ) -> Candidate:
        """The next node to try; once every capable node failed, the last node's own error."""
        try:
            return await self._acquire(model, capability, key, tried, deadline)
        except LlmlbError as exc:
            if last is not None and exc.code is ErrorCode.NO_CAPABLE_NODES:
                raise last.error from None
            raise

    async def _acquire(
        self, model: Model, capability: Capability, key: RouteKey | None, exclude: set[str], deadline: float
    ) -> Candidate:
        now = self._clock()
        _in_time(model, deadline, now)
        # Even with a node free at once, a call that takes longer than the time left would be answered
        # too late: refused now (429 with Retry-After), before any node starts on it.
        judge(
            at_once(self._service.of((model.id, capability))),
            model.id,
            wait_left_s=math.inf,
            deadline_left_s=deadline - now,
        )
        candidates, why = self._candidates.ranked(model, capability)
        if not any(c.tier == READY for c in candidates):
            self.deployed.cold(model.id)  # a deployment with no copy ready: the scheduler places one now
        node = self._pick(model, candidates, exclude, key)
        if node is None:
            self._none_yet(
                model, capability, candidates, exclude, why or "every capable node failed this request"
            )

            def attempt() -> Candidate | None:
                candidates, why = self._candidates.ranked(model, capability)
                node = self._pick(model, candidates, exclude, key)
                if node is None:
                    self._none_yet(model, capability, candidates, exclude, why or "no capable node left")
                return node

            def slots() -> int:
                candidates, _ = self._candidates.ranked(model, capability)
                config = self._config
                return sum(
                    capacity(
                        c, max_inflight=config.node_max_inflight, queue_allowance=config.node_queue_allowance
                    )
                    for c in candidates
                    if c.node_id not in exclude
                )

            def ready_in() -> float | None:
                return self.deployed.ready_in(model.id, self._clock())

            queue_key: Key = (model.id, capability)
            tracing.current_span().set_attribute("llmlb.route.queued", True)
            node = await self._queue.wait(queue_key, deadline, attempt, slots, ready_in)
        self._stats.started(node.node_id, model.id)
        return node

    def _none_yet(
        self, model: Model, capability: Capability, candidates: list[Candidate], exclude: set[str], why: str
    ) -> None:
        """Raises ``NO_CAPABLE_NODES`` when no node is left to try and none is on its way: a request
        for a model being downloaded, or a deployment's copy being placed, waits for it instead."""
        if not candidates and self._candidates.coming(model, capability):
            return
        _some_left(candidates, exclude, why)

    def _pick(
        self, model: Model, candidates: list[Candidate], exclude: set[str], key: RouteKey | None
    ) -> Candidate | None:
        choice = pick(
            candidates,
            exclude,
            self._stats,
            now=self._clock(),
            max_inflight=self._config.node_max_inflight,
            policy=self._policy,
            key=key,
            model_id=model.id,
            queue_allowance=self._config.node_queue_allowance,
        )
        if choice is None:
            return None
        span = tracing.current_span()
        if span.is_recording():
            self._traced(span, choice, len(candidates), len(exclude), key)
        if key is not None:
            # The node will hold these prefixes once it answers: the next turn finds it before its report.
            self._prefixes.routed(choice.node.node_id, key.model_id, key.prefixes)
        if self._metrics is not None and choice.outcome != LOAD:
            self._metrics.route_outcomes.labels(self._policy.name, choice.outcome).inc()
        return choice.node

    def _route_attributes(self, model: Model) -> dict[str, str] | None:
        if not tracing.enabled():
            return None
        return {"llmlb.model": model.id, "llmlb.route.policy": self._policy.name}

    def _traced(
        self, span: Span, choice: Choice, candidates: int, excluded: int, key: RouteKey | None
    ) -> None:
        """Says on the route's span which node the policy chose, how, and the numbers it weighed."""
        node_id = choice.node.node_id
        stats = self._stats.of(node_id)
        attributes: dict[str, str | int | float | bool] = {
            "llmlb.route.node": node_id,
            "llmlb.route.reason": choice.outcome,
            "llmlb.route.tier": TIER_NAMES.get(choice.node.tier, str(choice.node.tier)),
            "llmlb.route.candidates": candidates,
            "llmlb.route.excluded": excluded,
            "llmlb.route.load": self._stats.load(node_id),
            "llmlb.route.latency_ms": round(stats.latency_s * 1000, 3),
        }
        if key is not None:
            attributes["llmlb.route.prompt_chars"] = key.chars
            attributes["llmlb.route.held_chars"] = self._prefixes.held_chars(
                node_id, key.model_id, key.prefixes
            )
        span.set_attributes(attributes)

    def _release(self, node: Candidate, model_id: str) -> None:
        self._stats.ended(node.node_id, model_id)
        if self._queue.waiting:
            self._queue.wake(node.node_id)


def _call_span(route: Route[Any, Any], node: Candidate, attempt: int) -> Span:
    """The span of one call to a node (a no-op one while tracing is off); its context goes with the call."""
    if not tracing.enabled():
        return INVALID_SPAN
    return tracing.start(
        f"node {route.name}",
        kind=SpanKind.CLIENT,
        attributes={"llmlb.node": node.node_id, "server.address": node.address, "llmlb.attempt": attempt},
    )


def _failure_outcome(span: Span, exc: grpc.aio.AioRpcError) -> str:
    """The error code a failed node call's span records (classified only while tracing)."""
    return classify(exc).error.code.value if span.is_recording() else ""


def route_key(model_id: str, request: InferenceRequest) -> RouteKey | None:
    """What a cache-aware policy reads from ``request``; None for requests with no prompt to reuse."""
    if isinstance(request, ChatRequest):
        prefixes = chat_prefixes(request.messages)
    elif isinstance(request, CompleteRequest):
        prefixes = text_prefixes(request.prompt)
    else:
        return None
    return RouteKey(model_id, tuple(prefixes), request.prompt_cache_key or request.user)


def _in_time(model: Model, deadline: float, now: float) -> None:
    """Raises ``TIMEOUT`` once ``deadline`` has passed: no node starts work nobody waits for."""
    if now >= deadline:
        raise LlmlbError(
            ErrorCode.TIMEOUT, f"the request's deadline passed before a node serving {model.id!r} began"
        )


def _some_left(candidates: list[Candidate], exclude: set[str], why: str) -> None:
    """Raises ``NO_CAPABLE_NODES`` when every candidate was already tried (or there are none)."""
    if not any(c.node_id not in exclude for c in candidates):
        raise LlmlbError(ErrorCode.NO_CAPABLE_NODES, why, retry_after_s=NO_NODE_RETRY_AFTER_S)
