"""The node's ``Inference`` door: protobuf in, ``ModelPool`` call, protobuf out. Nothing else lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import grpc.aio

from common import inference_pb as conv
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import rpc_errors
from node.pool import ModelPool, ResolvedModel

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer(igrpc.InferenceServicer):
    """Executes inference on this node.

    ``resolve(model_id)`` finds the model's files (raising ``LlmlbError``, e.g. ``model_not_found``);
    ``node_id()`` names this node in answers. A client that goes away mid-stream cancels the handler,
    which stops the runtime and frees its slot.
    """

    def __init__(
        self,
        pool: ModelPool,
        resolve: Callable[[str], Awaitable[ResolvedModel]],
        node_id: Callable[[], str],
    ) -> None:
        self._pool = pool
        self._resolve = resolve
        self._node_id = node_id

    @rpc_errors
    async def Chat(self, request: ipb.ChatRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        chat = conv.chat_request_from_pb(request)
        resolved = await self._resolve(chat.model)
        node_id = self._node_id()
        async with aclosing(self._pool.chat(resolved, chat)) as chunks:
            async for chunk in chunks:
                yield conv.text_chunk_to_pb(replace(chunk, node_id=node_id))

    @rpc_errors
    async def Complete(self, request: ipb.CompleteRequest, context: Context) -> AsyncIterator[ipb.TextChunk]:
        complete = conv.complete_request_from_pb(request)
        resolved = await self._resolve(complete.model)
        node_id = self._node_id()
        async with aclosing(self._pool.complete(resolved, complete)) as chunks:
            async for chunk in chunks:
                yield conv.text_chunk_to_pb(replace(chunk, node_id=node_id))

    @rpc_errors
    async def Embed(self, request: ipb.EmbedRequest, context: Context) -> ipb.EmbedResponse:
        embed = conv.embed_request_from_pb(request)
        response = await self._pool.embed(await self._resolve(embed.model), embed)
        return conv.embed_response_to_pb(replace(response, node_id=self._node_id()))

    @rpc_errors
    async def Transcribe(self, request: ipb.TranscribeRequest, context: Context) -> ipb.TranscribeResponse:
        transcribe = conv.transcribe_request_from_pb(request)
        transcript = await self._pool.transcribe(await self._resolve(transcribe.model), transcribe)
        return conv.transcript_to_pb(replace(transcript, node_id=self._node_id()))

    @rpc_errors
    async def Speak(self, request: ipb.SpeakRequest, context: Context) -> AsyncIterator[ipb.AudioChunk]:
        speak = conv.speak_request_from_pb(request)
        resolved = await self._resolve(speak.model)
        async with aclosing(self._pool.speak(resolved, speak)) as chunks:
            async for chunk in chunks:
                yield conv.audio_chunk_to_pb(chunk)

    @rpc_errors
    async def GenerateImage(
        self, request: ipb.GenerateImageRequest, context: Context
    ) -> ipb.GenerateImageResponse:
        generate = conv.image_request_from_pb(request)
        response = await self._pool.generate_images(await self._resolve(generate.model), generate)
        return conv.image_response_to_pb(replace(response, node_id=self._node_id()))
