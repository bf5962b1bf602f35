"""The node's ``Inference`` door: protobuf in, ``ModelPool`` call, protobuf out.

The door also keeps the node's request accounting: each call is counted in the node's metrics with
its outcome, counted as in flight while it runs (a drain waits for those), and refused once the node
is draining so the balancer tries it elsewhere. Each call is a span (``common.tracing``), child of the
``traceparent`` the balancer's node call sent; the pool's spans (waiting for a slot, loading, running
the runtime) are its children.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import grpc.aio
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from common import inference_pb as conv
from common import tracing
from common.errors import ErrorCode, LlmlbError
from common.inference import Usage
from common.metrics import NodeMetrics
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import rpc_errors
from node.pool import ModelPool, ResolvedModel

Context = grpc.aio.ServicerContext[Any, Any]
DOOR = "grpc"
TEXT_ROUTES = ("chat", "complete")  # the routes whose prompts may come from a kept prefix


@dataclass(slots=True)
class _Call:
    """One request on its way through: what its metrics and its span need to know."""

    route: str
    metrics: NodeMetrics
    started: float = field(default_factory=time.monotonic)
    model: str = ""  # set once resolved, so unknown names never become label values
    chunks: int = 0
    span: Span = INVALID_SPAN  # a no-op span while tracing is off

    def resolved(self, resolved: ResolvedModel) -> ResolvedModel:
        self.model = resolved.model.id
        if self.span.is_recording():
            self.span.set_attribute("llmlb.model", self.model)
        return resolved

    def chunk(self, usage: Usage | None = None) -> None:
        if not self.chunks:
            self.metrics.first_token(self.route, time.monotonic() - self.started)
        self.chunks += 1
        if usage is not None:
            self.used(usage)

    def used(self, usage: Usage) -> None:
        self.metrics.tokens(self.model, usage.prompt_tokens, usage.completion_tokens)
        if self.span.is_recording():
            self.span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": usage.completion_tokens,
                    "llmlb.cached_tokens": usage.cached_tokens,
                }
            )
        if self.route in TEXT_ROUTES:  # say how much of the prompt a kept prefix gave
            cached = min(usage.cached_tokens, usage.prompt_tokens)
            self.metrics.prompt_tokens(self.model, cached, usage.prompt_tokens - cached)


class InferenceServicer(igrpc.InferenceServicer):
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

    @contextmanager
    def _call(self, route: str, context: Context) -> Iterator[_Call]:
        call = _Call(route, self._metrics, span=self._span(route, context))
        code = "ok"
        try:
            if self._draining():
                raise LlmlbError(ErrorCode.NO_CAPABLE_NODES, f"node {self._node_id()} is draining")
            self._in_flight += 1
            self._idle.clear()
            try:
                yield call
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
            self._metrics.observe(DOOR, route, call.model, code, time.monotonic() - call.started)
            tracing.finish(call.span, code)

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

    @rpc_errors
    async def Chat(self, request: ipb.ChatRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        with self._call("chat", context) as call:
            chat = conv.chat_request_from_pb(request)
            with tracing.current(call.span):
                resolved = call.resolved(await self._resolve(chat.model))
            node_id = self._node_id()
            async with aclosing(tracing.within(call.span, self._pool.chat(resolved, chat))) as chunks:
                async for chunk in chunks:
                    call.chunk(chunk.usage)
                    yield conv.text_chunk_to_pb(replace(chunk, node_id=node_id))

    @rpc_errors
    async def Complete(self, request: ipb.CompleteRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        with self._call("complete", context) as call:
            complete = conv.complete_request_from_pb(request)
            with tracing.current(call.span):
                resolved = call.resolved(await self._resolve(complete.model))
            node_id = self._node_id()
            async with aclosing(tracing.within(call.span, self._pool.complete(resolved, complete))) as chunks:
                async for chunk in chunks:
                    call.chunk(chunk.usage)
                    yield conv.text_chunk_to_pb(replace(chunk, node_id=node_id))

    @rpc_errors
    async def Embed(self, request: ipb.EmbedRequest, context: Context) -> ipb.EmbedResponse:
        with self._call("embed", context) as call:
            embed = conv.embed_request_from_pb(request)
            with tracing.current(call.span):
                response = await self._pool.embed(call.resolved(await self._resolve(embed.model)), embed)
            call.used(response.usage)
            return conv.embed_response_to_pb(replace(response, node_id=self._node_id()))

    @rpc_errors
    async def Transcribe(self, request: ipb.TranscribeRequest, context: Context) -> ipb.TranscribeResponse:
        with self._call("transcribe", context) as call:
            transcribe = conv.transcribe_request_from_pb(request)
            with tracing.current(call.span):
                resolved = call.resolved(await self._resolve(transcribe.model))
                transcript = await self._pool.transcribe(resolved, transcribe)
            return conv.transcript_to_pb(replace(transcript, node_id=self._node_id()))

    @rpc_errors
    async def Speak(self, request: ipb.SpeakRequest, context: Context) -> AsyncIterator[ipb.AudioChunk]:
        with self._call("speak", context) as call:
            speak = conv.speak_request_from_pb(request)
            with tracing.current(call.span):
                resolved = call.resolved(await self._resolve(speak.model))
            async with aclosing(tracing.within(call.span, self._pool.speak(resolved, speak))) as chunks:
                async for chunk in chunks:
                    call.chunk()
                    yield conv.audio_chunk_to_pb(chunk)

    @rpc_errors
    async def GenerateImage(
        self, request: ipb.GenerateImageRequest, context: Context
    ) -> ipb.GenerateImageResponse:
        with self._call("image", context) as call:
            generate = conv.image_request_from_pb(request)
            with tracing.current(call.span):
                resolved = call.resolved(await self._resolve(generate.model))
                response = await self._pool.generate_images(resolved, generate)
            return conv.image_response_to_pb(replace(response, node_id=self._node_id()))
