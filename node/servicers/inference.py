"""The node's ``Inference`` door: protobuf in, ``ModelPool`` call, protobuf out.

Every RPC is a row (``Rpc``: its kind of call, its request's and answer's conversions) taken down one of
two paths, ``_unary`` or ``_stream``, which mirror the pool's. Those paths keep the node's request
accounting: each call is counted in the node's metrics with its outcome, counted as in flight while it
runs (a drain waits for those), and refused once the node is draining so the balancer tries it
elsewhere. Each call is a span (``common.tracing``), child of the ``traceparent`` the balancer's node
call sent; the pool's spans (waiting for a slot, loading, running the runtime) are its children.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import grpc.aio
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from common import inference_pb as conv
from common import tracing
from common.errors import ErrorCode, LlmlbError
from common.inference import (
    EmbedResponse,
    GenerateImageResponse,
    InferenceRequest,
    TextChunk,
    Transcript,
)
from common.metrics import NodeMetrics
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import rpc_errors
from node import kinds
from node.kinds import Kind
from node.pool import ModelPool, ResolvedModel

Context = grpc.aio.ServicerContext[Any, Any]
DOOR = "grpc"
M = TypeVar("M")  # a request in protobuf
R = TypeVar("R", bound=InferenceRequest)
T = TypeVar("T")
P = TypeVar("P")  # an answer (or one item of it) in protobuf
Answer = TypeVar("Answer", TextChunk, EmbedResponse, Transcript, GenerateImageResponse)


@dataclass(frozen=True, slots=True)
class Rpc(Generic[M, R, T, P]):
    """One RPC of the ``Inference`` service: its kind of call, and how its request and answer convert."""

    kind: Kind[R, T]
    parse: Callable[[M], R]
    encode: Callable[[T, str], P]  # the answer (or one item) and this node's id -> protobuf


def _from_node(to_pb: Callable[[Answer], P]) -> Callable[[Answer, str], P]:
    """``to_pb`` for an answer that names the node that gave it."""
    return lambda answer, node_id: to_pb(replace(answer, node_id=node_id))


CHAT = Rpc(kinds.CHAT, conv.chat_request_from_pb, _from_node(conv.text_chunk_to_pb))
COMPLETE = Rpc(kinds.COMPLETE, conv.complete_request_from_pb, _from_node(conv.text_chunk_to_pb))
EMBED = Rpc(kinds.EMBED, conv.embed_request_from_pb, _from_node(conv.embed_response_to_pb))
TRANSCRIBE = Rpc(kinds.TRANSCRIBE, conv.transcribe_request_from_pb, _from_node(conv.transcript_to_pb))
SPEAK = Rpc(kinds.SPEAK, conv.speak_request_from_pb, lambda chunk, _node_id: conv.audio_chunk_to_pb(chunk))
IMAGE = Rpc(kinds.IMAGE, conv.image_request_from_pb, _from_node(conv.image_response_to_pb))


@dataclass(slots=True)
class _Tally:
    """What the node's metrics and the call's span record of one request while it is served."""

    kind: Kind[Any, Any]
    metrics: NodeMetrics
    started: float = field(default_factory=time.monotonic)
    model: str = ""  # set once resolved, so unknown names never become label values
    items: int = 0
    span: Span = INVALID_SPAN  # a no-op span while tracing is off

    def resolved(self, resolved: ResolvedModel) -> ResolvedModel:
        self.model = resolved.model.id
        if self.span.is_recording():
            self.span.set_attribute("llmlb.model", self.model)
        return resolved

    def item(self, item: Any) -> None:
        """One item of a stream: the first times the first token; the one with usage counts it."""
        if not self.items:
            self.metrics.first_token(self.kind.route, time.monotonic() - self.started)
        self.items += 1
        self.answer(item)

    def answer(self, answer: Any) -> None:
        """Counts the tokens ``answer`` (or a stream's item) accounts for, if any."""
        usage = self.kind.usage(answer)
        if usage is None:
            return
        self.metrics.tokens(self.model, usage.prompt_tokens, usage.completion_tokens)
        if self.span.is_recording():
            self.span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": usage.completion_tokens,
                    "llmlb.cached_tokens": usage.cached_tokens,
                }
            )
        if self.kind.prefixed:  # say how much of the prompt a kept prefix gave
            cached = min(usage.cached_tokens, usage.prompt_tokens)
            self.metrics.prompt_tokens(self.model, cached, usage.prompt_tokens - cached)


class NodeInferenceServicer(igrpc.InferenceServicer):
    """Executes inference on this node.

    ``resolve(model_id)`` finds the model's files (raising ``LlmlbError``, e.g. ``model_not_found``);
    ``node_id()`` names this node in answers; while ``draining()`` is true new calls are refused with
    ``no_capable_nodes`` and calls in flight go on. A client that goes away mid-stream cancels the
    handler, which stops the runtime and frees its slot.
    """

    def __init__(
        self,
        pool: ModelPool,
        resolve: Callable[[str], Awaitable[ResolvedModel]],
        node_id: Callable[[], str],
        *,
        metrics: NodeMetrics | None = None,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self._pool = pool
        self._resolve = resolve
        self._node_id = node_id
        self._metrics = metrics or NodeMetrics(dict)
        self._draining = draining
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        """Calls being served right now (resolving, queued, or running)."""
        return self._in_flight

    async def wait_idle(self) -> None:
        """Returns once no call is in flight."""
        await self._idle.wait()

    @rpc_errors
    async def Chat(self, request: ipb.ChatRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        async with aclosing(self._stream(CHAT, request, context)) as items:
            async for item in items:
                yield item

    @rpc_errors
    async def Complete(self, request: ipb.CompleteRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        async with aclosing(self._stream(COMPLETE, request, context)) as items:
            async for item in items:
                yield item

    @rpc_errors
    async def Speak(self, request: ipb.SpeakRequest, context: Context) -> AsyncIterator[ipb.AudioChunk]:
        async with aclosing(self._stream(SPEAK, request, context)) as items:
            async for item in items:
                yield item

    @rpc_errors
    async def Embed(self, request: ipb.EmbedRequest, context: Context) -> ipb.EmbedResponse:
        return await self._unary(EMBED, request, context)

    @rpc_errors
    async def Transcribe(self, request: ipb.TranscribeRequest, context: Context) -> ipb.TranscribeResponse:
        return await self._unary(TRANSCRIBE, request, context)

    @rpc_errors
    async def GenerateImage(
        self, request: ipb.GenerateImageRequest, context: Context
    ) -> ipb.GenerateImageResponse:
        return await self._unary(IMAGE, request, context)

    async def _unary(self, rpc: Rpc[M, R, T, P], message: M, context: Context) -> P:
        """The one path of every unary RPC: parsed, resolved, answered by the pool, counted, encoded."""
        with self._serving(rpc.kind, context) as tally:
            request = rpc.parse(message)  # inside: a refused request is counted like any other outcome
            with tracing.current(tally.span):
                resolved = tally.resolved(await self._resolve(request.model))
                answer = await self._pool.unary(rpc.kind, resolved, request)
            tally.answer(answer)
            return rpc.encode(answer, self._node_id())

    async def _stream(self, rpc: Rpc[M, R, T, P], message: M, context: Context) -> AsyncGenerator[P, None]:
        """The one path of every streamed RPC: parsed, resolved, streamed by the pool, counted, encoded."""
        with self._serving(rpc.kind, context) as tally:
            request = rpc.parse(message)
            with tracing.current(tally.span):
                resolved = tally.resolved(await self._resolve(request.model))
            node_id = self._node_id()
            items = tracing.within(tally.span, self._pool.stream(rpc.kind, resolved, request))
            async with aclosing(items):
                async for item in items:
                    tally.item(item)
                    yield rpc.encode(item, node_id)

    @contextmanager
    def _serving(self, kind: Kind[Any, Any], context: Context) -> Iterator[_Tally]:
        """One call served: refused while draining, counted in flight, its outcome in metrics and span."""
        tally = _Tally(kind, self._metrics, span=self._span(kind.route, context))
        code = "ok"
        try:
            if self._draining():
                raise LlmlbError(ErrorCode.NO_CAPABLE_NODES, f"node {self._node_id()} is draining")
            self._in_flight += 1
            self._idle.clear()
            try:
                yield tally
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()
        except LlmlbError as exc:
            code = exc.code.value
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = ErrorCode.CANCELLED.value  # the caller went away
            raise
        except Exception:
            code = ErrorCode.INTERNAL.value
            raise
        finally:
            self._metrics.observe(DOOR, kind.route, tally.model, code, time.monotonic() - tally.started)
            tracing.finish(tally.span, code)

    def _span(self, route: str, context: Context) -> Span:
        """The call's span, child of the caller's (the balancer's node call) when it sent one."""
        if not tracing.enabled():
            return INVALID_SPAN
        return tracing.start(
            f"xllm {route}",
            kind=SpanKind.SERVER,
            parent=tracing.from_metadata(context.invocation_metadata),
            attributes={"llmlb.route": route, "llmlb.node": self._node_id()},
        )
