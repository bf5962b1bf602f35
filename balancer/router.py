"""The router: picks a node for each inference request and carries the call there, for both doors.

Candidates are online, non-draining nodes whose runtimes serve the capability. They are ranked by how
ready the model is on them (loaded, then on disk, then to be downloaded); among equals, two are drawn
at random and the one with fewer outstanding requests times its latency average wins (power of two
choices). A node that fails before the caller got anything is left for another; repeated failures put
it in cooldown. When every candidate is busy, requests wait in a bounded queue.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
import structlog

from balancer.fleet import Fleet, ModelOnNode
from balancer.node_clients import NodeClients
from balancer.registry import Registry
from common import inference_pb as conv
from common.config import BalancerConfig
from common.errors import GRPC_CODE_KEY, ErrorCode, LlmlbError
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
from common.metrics import BalancerMetrics
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import error_from_rpc
from common.types import Capability, Model

log = structlog.get_logger(__name__)

# Tiers: how soon a node can answer for the model. Lower is better.
READY, ON_DISK, DOWNLOADABLE = 0, 1, 2
_TIER = {"ready": READY, "loading": ON_DISK, "present": ON_DISK, "absent": DOWNLOADABLE}
EWMA_ALPHA = 0.3
FIRST_LATENCY_S = 0.05  # a node's latency average before its first answer
QUEUE_RECHECK_S = 0.5  # queued requests also look again this often, for nodes that came online
# Node-side errors worth another node: the node is going away, full, or broken.
RETRY_ELSEWHERE = frozenset(
    {
        ErrorCode.NO_CAPABLE_NODES,
        ErrorCode.QUEUE_FULL,
        ErrorCode.INTERNAL,
        ErrorCode.INSUFFICIENT_STORAGE,
        ErrorCode.DOWNLOAD_FAILED,
        ErrorCode.ORIGIN_UNREACHABLE,
    }
)


class _Request(Protocol):
    @property
    def model(self) -> str: ...

    @property
    def request_id(self) -> str: ...

    def validate(self) -> None: ...


R = TypeVar("R", bound=_Request)


@dataclass(slots=True)
class NodeStats:
    """The balancer's own view of one node's load and health."""

    outstanding: int = 0
    latency_s: float = FIRST_LATENCY_S
    failures: int = 0  # consecutive
    cooldown_until: float = 0.0

    def score(self) -> float:
        return (self.outstanding + 1) * self.latency_s


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    address: str
    tier: int


@dataclass(frozen=True, slots=True)
class _Failure:
    error: LlmlbError
    retry: bool  # worth trying another node
    node_fault: bool  # counts toward the node's cooldown


def _failure(exc: grpc.aio.AioRpcError) -> _Failure:
    """What a failed node call means: the node's own error, or the node gone or broken."""
    trailing: Any = exc.trailing_metadata() or ()
    from_node = any(key == GRPC_CODE_KEY for key, _ in trailing)
    status = exc.code()
    if not from_node:
        if status is grpc.StatusCode.DEADLINE_EXCEEDED:
            return _Failure(LlmlbError(ErrorCode.TIMEOUT, "the request's deadline passed"), False, False)
        if status is grpc.StatusCode.CANCELLED:
            return _Failure(LlmlbError(ErrorCode.CANCELLED, "the request was cancelled"), False, False)
        # Connection refused or reset, or an error outside our handlers: the node, not the request.
        return _Failure(LlmlbError(ErrorCode.NO_CAPABLE_NODES, f"node failed: {exc.details()}"), True, True)
    error = error_from_rpc(exc)
    if error.code is ErrorCode.UNAUTHORIZED:
        # The node refused the balancer's own credential (a token it no longer holds): the client's key
        # passed at this door, so this is the node's fault, not a 401 for the client.
        message = f"node refused the balancer's credential: {error.message}"
        return _Failure(LlmlbError(ErrorCode.NO_CAPABLE_NODES, message), True, True)
    if error.code is ErrorCode.QUEUE_FULL and error.retry_after_s is None:
        error.retry_after_s = 1.0  # a full node frees a slot within about a generation
    retry = error.code in RETRY_ELSEWHERE
    return _Failure(error, retry, retry and error.code is not ErrorCode.QUEUE_FULL)


class Router:
    """Transport-neutral inference routing: the gRPC servicer and the HTTP shim both call this."""

    def __init__(
        self,
        config: BalancerConfig,
        registry: Registry,
        fleet: Fleet,
        clients: NodeClients,
        metrics: BalancerMetrics | None = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._fleet = fleet
        self._clients = clients
        self._metrics = metrics
        self._stats: dict[str, NodeStats] = {}
        self._candidates: dict[tuple[str, Capability], tuple[int, list[Candidate], str]] = {}
        # Queued requests in arrival order, per model and capability; a freed slot wakes the oldest one
        # that can use that node, not every waiter.
        self._queues: dict[tuple[str, Capability], deque[asyncio.Event]] = {}
        self.waiting = 0  # requests in the queue now

    # -- the six calls ---------------------------------------------------------------------------

    async def chat(self, request: ChatRequest, *, timeout: float | None = None) -> AsyncIterator[TextChunk]:
        """Streams a chat answer from the best node; errors before the first chunk are retried elsewhere."""
        request = self._prepare(request)
        pb = conv.chat_request_to_pb(request)
        stream = self._stream(
            "chat", request.model, Capability.CHAT, lambda s, t: s.Chat(pb, timeout=t), timeout
        )
        async with aclosing(stream) as chunks:
            async for msg in chunks:
                yield conv.text_chunk_from_pb(msg)

    async def complete(
        self, request: CompleteRequest, *, timeout: float | None = None
    ) -> AsyncIterator[TextChunk]:
        """Streams a text completion, like ``chat``."""
        request = self._prepare(request)
        pb = conv.complete_request_to_pb(request)
        stream = self._stream(
            "complete", request.model, Capability.COMPLETION, lambda s, t: s.Complete(pb, timeout=t), timeout
        )
        async with aclosing(stream) as chunks:
            async for msg in chunks:
                yield conv.text_chunk_from_pb(msg)

    async def chat_whole(self, request: ChatRequest, *, timeout: float | None = None) -> list[TextChunk]:
        """The whole chat answer at once, for callers that did not ask for a stream.

        Nothing reaches the caller before the end, so a node that fails mid-answer is retried elsewhere.
        """
        request = self._prepare(request)
        pb = conv.chat_request_to_pb(request)
        return await self._whole(
            "chat", request.model, Capability.CHAT, lambda s, t: s.Chat(pb, timeout=t), timeout
        )

    async def complete_whole(
        self, request: CompleteRequest, *, timeout: float | None = None
    ) -> list[TextChunk]:
        """The whole completion at once; retried elsewhere like ``chat_whole``."""
        request = self._prepare(request)
        pb = conv.complete_request_to_pb(request)
        return await self._whole(
            "complete", request.model, Capability.COMPLETION, lambda s, t: s.Complete(pb, timeout=t), timeout
        )

    async def embed(self, request: EmbedRequest, *, timeout: float | None = None) -> EmbedResponse:
        request = self._prepare(request)
        pb = conv.embed_request_to_pb(request)
        msg = await self._unary(
            "embed", request.model, Capability.EMBEDDING, lambda s, t: s.Embed(pb, timeout=t), timeout
        )
        return conv.embed_response_from_pb(msg)

    async def transcribe(self, request: TranscribeRequest, *, timeout: float | None = None) -> Transcript:
        request = self._prepare(request)
        pb = conv.transcribe_request_to_pb(request)
        msg = await self._unary(
            "transcribe",
            request.model,
            Capability.TRANSCRIPTION,
            lambda s, t: s.Transcribe(pb, timeout=t),
            timeout,
        )
        return conv.transcript_from_pb(msg)

    async def speak(
        self, request: SpeakRequest, *, timeout: float | None = None
    ) -> AsyncIterator[AudioChunk]:
        request = self._prepare(request)
        pb = conv.speak_request_to_pb(request)
        stream = self._stream(
            "speak", request.model, Capability.SPEECH, lambda s, t: s.Speak(pb, timeout=t), timeout
        )
        async with aclosing(stream) as chunks:
            async for msg in chunks:
                yield conv.audio_chunk_from_pb(msg)

    async def generate_images(
        self, request: GenerateImageRequest, *, timeout: float | None = None
    ) -> GenerateImageResponse:
        request = self._prepare(request)
        pb = conv.image_request_to_pb(request)
        msg = await self._unary(
            "image", request.model, Capability.IMAGE, lambda s, t: s.GenerateImage(pb, timeout=t), timeout
        )
        return conv.image_response_from_pb(msg)

    # -- carrying a call ---------------------------------------------------------------------------

    def _prepare(self, request: R) -> R:
        request.validate()
        if not request.request_id:
            request = replace(request, request_id=uuid.uuid4().hex)  # type: ignore[type-var]
        return request

    async def _unary(
        self,
        route: str,
        model_id: str,
        capability: Capability,
        call: Callable[[igrpc.InferenceStub, float], Any],  # an awaitable unary call
        timeout: float | None,
    ) -> Any:
        deadline = time.monotonic() + (timeout or self._config.request_timeout_s)
        model = await self._model(model_id, capability)
        tried: set[str] = set()
        last: _Failure | None = None
        while True:
            node = await self._next_node(model, capability, tried, deadline, last)
            started = time.monotonic()
            try:
                result = await call(self._stub(node), max(0.001, deadline - started))
            except grpc.aio.AioRpcError as exc:
                failure = last = _failure(exc)
                self._failed(node, failure)
                tried.add(node.node_id)
                if not failure.retry or len(tried) >= self._config.route_attempts:
                    raise failure.error from None
                self._retrying(route, model.id, node, failure)
                continue
            finally:
                self._release(node)
            self._answered(node, time.monotonic() - started)
            return result

    async def _stream(
        self,
        route: str,
        model_id: str,
        capability: Capability,
        call: Callable[[igrpc.InferenceStub, float], Any],
        timeout: float | None,
    ) -> AsyncGenerator[Any, None]:
        deadline = time.monotonic() + (timeout or self._config.request_timeout_s)
        model = await self._model(model_id, capability)
        tried: set[str] = set()
        last: _Failure | None = None
        while True:
            node = await self._next_node(model, capability, tried, deadline, last)
            started = time.monotonic()
            stream = call(self._stub(node), max(0.001, deadline - started))
            items = aiter(stream)
            try:
                try:
                    first = await anext(items)
                except StopAsyncIteration:
                    self._answered(node, time.monotonic() - started)
                    return
                except grpc.aio.AioRpcError as exc:
                    failure = last = _failure(exc)
                    self._failed(node, failure)
                    tried.add(node.node_id)
                    if not failure.retry or len(tried) >= self._config.route_attempts:
                        raise failure.error from None
                    self._retrying(route, model.id, node, failure)
                    continue
                self._answered(node, time.monotonic() - started)
                yield first
                # Past the first item the caller has bytes: a failure now ends the stream, no retry.
                try:
                    async for item in items:
                        yield item
                except grpc.aio.AioRpcError as exc:
                    failure = _failure(exc)
                    self._failed(node, failure)
                    raise failure.error from None
                return
            finally:
                stream.cancel()  # a no-op once finished; stops the node when the caller left early
                self._release(node)

    async def _whole(
        self,
        route: str,
        model_id: str,
        capability: Capability,
        open_stream: Callable[[igrpc.InferenceStub, float], Any],
        timeout: float | None,
    ) -> list[TextChunk]:
        """A streamed answer read to its end on the node, so the whole call can be retried elsewhere."""

        async def call(stub: igrpc.InferenceStub, time_left: float) -> list[Any]:
            answer: Any = open_stream(stub, time_left)
            return [m async for m in answer]

        msgs = await self._unary(route, model_id, capability, call, timeout)
        return [conv.text_chunk_from_pb(m) for m in msgs]

    def _stub(self, node: Candidate) -> igrpc.InferenceStub:
        return self._clients.stub(node.node_id, node.address, self._fleet.token(node.node_id))

    # -- choosing a node ---------------------------------------------------------------------------

    async def _model(self, model_id: str, capability: Capability) -> Model:
        model = await self._registry.get(model_id)
        if capability not in model.capabilities:
            raise LlmlbError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {model.id!r} does not support {capability.value}",
            )
        return model

    def _ranked(self, model: Model, capability: Capability) -> tuple[list[Candidate], str]:
        """Nodes that could serve the request, best tier first, and why there are none when so."""
        key = (model.id, capability)
        cached = self._candidates.get(key)
        if cached is not None and cached[0] == self._fleet.version:
            return cached[1], cached[2]
        capable = []
        for node_id in self._fleet.online():
            info = self._fleet.info(node_id)
            if info is not None and capability in info.capabilities:
                capable.append((info, self._fleet.state_on(node_id, model.id)))
        candidates: list[Candidate] = []
        downloading: list[ModelOnNode] = []
        failed: list[ModelOnNode] = []
        for info, state in capable:
            name = state.state if state is not None else "absent"
            if name == "downloading" and state is not None:
                downloading.append(state)
            elif name == "failed" and state is not None:
                failed.append(state)
            else:
                candidates.append(Candidate(info.node_id, info.address, _TIER.get(name, DOWNLOADABLE)))
        if downloading and not any(c.tier < DOWNLOADABLE for c in candidates):
            # One download is under way; starting another elsewhere would only compete with it.
            candidates = []
        candidates.sort(key=lambda c: c.tier)
        why = ""
        if not candidates:
            if downloading:
                best = max(downloading, key=lambda s: s.downloaded_bytes)
                total = best.total_bytes or model.total_bytes
                pct = f"{100 * best.downloaded_bytes / total:.0f}%" if total else "started"
                why = f"model {model.id!r} is downloading on {best.node_id} ({pct}); retry shortly"
            elif failed:
                why = f"model {model.id!r} failed on every capable node: {failed[0].error or 'see node logs'}"
            else:
                why = f"no online node can serve {capability.value} for model {model.id!r}"
        self._candidates[key] = (self._fleet.version, candidates, why)
        return candidates, why

    def _pick(self, candidates: list[Candidate], exclude: set[str]) -> Candidate | None:
        """Best tier with a node not busy and not cooling down; power of two choices within it."""
        now = time.monotonic()
        limit = self._config.node_max_inflight
        usable = [c for c in candidates if c.node_id not in exclude]
        healthy = [c for c in usable if self._stats_of(c.node_id).cooldown_until <= now]
        pool = healthy or usable  # every node cooling down: try one rather than refuse
        free = [c for c in pool if self._stats_of(c.node_id).outstanding < limit]
        if not free:
            return None
        best = free[0].tier
        tier = [c for c in free if c.tier == best]
        if len(tier) == 1:
            return tier[0]
        a, b = random.sample(tier, 2)
        return a if self._stats_of(a.node_id).score() <= self._stats_of(b.node_id).score() else b

    async def _next_node(
        self, model: Model, capability: Capability, tried: set[str], deadline: float, last: _Failure | None
    ) -> Candidate:
        """The next node to try; once every capable node failed, the last node's own error."""
        try:
            return await self._acquire(model, capability, tried, deadline)
        except LlmlbError as exc:
            if last is not None and exc.code is ErrorCode.NO_CAPABLE_NODES:
                raise last.error from None
            raise

    async def _acquire(
        self, model: Model, capability: Capability, exclude: set[str], deadline: float
    ) -> Candidate:
        candidates, why = self._ranked(model, capability)
        node = self._pick(candidates, exclude)
        if node is None:
            node = await self._queue(model, capability, exclude, deadline, why)
        self._stats_of(node.node_id).outstanding += 1
        return node

    async def _queue(
        self, model: Model, capability: Capability, exclude: set[str], deadline: float, why: str
    ) -> Candidate:
        candidates, why = self._ranked(model, capability)
        if not [c for c in candidates if c.node_id not in exclude]:
            code = ErrorCode.NO_CAPABLE_NODES
            raise LlmlbError(code, why or "every capable node failed this request", retry_after_s=5.0)
        if self.waiting >= self._config.queue_size:
            raise LlmlbError(
                ErrorCode.QUEUE_FULL,
                f"every node serving {model.id!r} is busy and the queue is full; retry shortly",
                retry_after_s=1.0,
            )
        until = min(deadline, time.monotonic() + self._config.queue_timeout_s)
        queue = self._queues.setdefault((model.id, capability), deque())
        turn = asyncio.Event()
        queue.append(turn)
        self.waiting += 1
        try:
            while True:
                left = until - time.monotonic()
                if left <= 0:
                    raise LlmlbError(
                        ErrorCode.TIMEOUT, f"waited too long for a free node serving {model.id!r}"
                    )
                with suppress(TimeoutError):
                    await asyncio.wait_for(turn.wait(), min(left, QUEUE_RECHECK_S))
                candidates, why = self._ranked(model, capability)
                node = self._pick(candidates, exclude)
                if node is not None:
                    return node
                if not [c for c in candidates if c.node_id not in exclude]:
                    raise LlmlbError(
                        ErrorCode.NO_CAPABLE_NODES, why or "no capable node left", retry_after_s=5.0
                    )
                if turn.is_set():  # woken, but another request took the slot first: keep our place
                    turn.clear()
                    queue.appendleft(turn)
        finally:
            self.waiting -= 1
            if turn in queue:
                queue.remove(turn)
            elif turn.is_set():
                self._wake(None)  # woken but leaving: hand the turn on
            if not queue:
                self._queues.pop((model.id, capability), None)

    # -- bookkeeping -------------------------------------------------------------------------------

    def _stats_of(self, node_id: str) -> NodeStats:
        stats = self._stats.get(node_id)
        if stats is None:
            stats = self._stats[node_id] = NodeStats()
        return stats

    def _release(self, node: Candidate) -> None:
        self._stats_of(node.node_id).outstanding -= 1
        if self.waiting:
            self._wake(node.node_id)

    def _wake(self, node_id: str | None) -> None:
        """Wakes the oldest queued request that ``node_id`` could serve (any, when None)."""
        for key, queue in self._queues.items():
            if not queue:
                continue
            cached = self._candidates.get(key)
            if node_id is None or cached is None or any(c.node_id == node_id for c in cached[1]):
                queue.popleft().set()
                return

    def _answered(self, node: Candidate, seconds: float) -> None:
        stats = self._stats_of(node.node_id)
        stats.latency_s += EWMA_ALPHA * (seconds - stats.latency_s)
        stats.failures = 0

    def _failed(self, node: Candidate, failure: _Failure) -> None:
        if not failure.node_fault:
            return
        stats = self._stats_of(node.node_id)
        stats.failures += 1
        if stats.failures >= self._config.cooldown_failures:
            stats.cooldown_until = time.monotonic() + self._config.cooldown_s
            log.warning(
                "node.cooldown",
                node_id=node.node_id,
                failures=stats.failures,
                seconds=self._config.cooldown_s,
            )

    def _retrying(self, route: str, model_id: str, node: Candidate, failure: _Failure) -> None:
        log.info(
            "route.retry",
            route=route,
            model_id=model_id,
            node_id=node.node_id,
            error=failure.error.code.value,
            detail=failure.error.message,
        )
        if self._metrics is not None:
            self._metrics.retries.labels(route).inc()

    def stats(self) -> dict[str, NodeStats]:
        """Per-node outstanding requests, latency average and failures, for status views."""
        return dict(self._stats)
