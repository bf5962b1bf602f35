"""The OpenAI-compatible routes under ``/v1``: parse, the inference plane, answer in OpenAI's shapes.

Thin on purpose: conversion lives in ``openai_requests`` and ``openai_answers``; admission, limits,
metrics and routing in the inference plane (``balancer.edge.plane``), shared with the gRPC door. A
streamed answer whose error comes before its first chunk is a plain JSON error with its status.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from balancer import control
from balancer.edge.deadline import REQUEST_TIMEOUT_HEADER, header_timeout
from balancer.edge.plane import CHAT, COMPLETE, EMBED, IMAGE, SPEAK, TRANSCRIBE, Door, Exchange
from balancer.http import openai_answers as out
from balancer.http import openai_requests as cv
from balancer.http.resources import deleted_json, openai_model_json, openai_model_list_json
from balancer.http.route_table import Handlers
from balancer.http.schemas import (
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    ImageGenerationBody,
    SpeechBody,
)
from balancer.http.streaming import StreamingAnswer, encoded, watching
from balancer.http.transcript_formats import parse_format, render
from balancer.parts import BalancerParts
from common import tracing
from common.errors import ErrorCode, LlmlbError
from common.inference import (
    ChatRequest,
    CompleteRequest,
    FinishReason,
    GenerateImageRequest,
    GenerateImageResponse,
    ImageOperation,
    TextChunk,
)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
MAX_FORM_FIELDS = 64


def request_id(request: Request) -> str:
    """The caller's ``X-Request-Id``, checked at admission like the gRPC door's ``request_id`` field."""
    return request.headers.get("x-request-id", "")


def door(request: Request) -> Door:
    """The HTTP door of one request: its ``traceparent``, ``X-Request-Timeout`` (the gRPC deadline's
    twin, ``balancer.edge.deadline``) and the disconnect that cancels its work."""
    return Door(
        "http",
        tracing.from_headers(request.headers),
        f"{request.method} {request.url.path}",
        deadline=lambda: header_timeout(request.headers.get(REQUEST_TIMEOUT_HEADER)),
        watch=watching(request.receive),
    )


def answer_headers(exchange: Exchange[Any, Any], node_id: str | None = None) -> dict[str, str]:
    """``x-request-id``, ``x-llmlb-node`` (unless None) and a limited key's rate-limit headers."""
    node = {} if node_id is None else {"x-llmlb-node": node_id}
    return {"x-request-id": exchange.request_id, **node, **dict(exchange.headers)}


def json_response(payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(out.dumps(payload), media_type="application/json", headers=headers)


async def text_answer(
    exchange: Exchange[Any, TextChunk],
    internal: ChatRequest | CompleteRequest,
    stream: bool,
    include_usage: bool,
    *,
    chat: bool,
) -> Response:
    """A chat or text completion: one JSON object, or its chunks as server-sent events."""
    logprobs = internal.params.logprobs
    if not stream:
        chunks = await exchange.whole(internal)
        completion_id = ("chatcmpl-" if chat else "cmpl-") + exchange.request_id
        choices, last = out.join_choices(chunks)
        created = last.created if last and last.created else int(time.time())
        shown = last.model if last and last.model else exchange.model
        render = out.chat_completion_json if chat else out.text_completion_json
        payload = render(completion_id, created, shown, choices, out.usage_of(chunks), logprobs)
        return json_response(payload, answer_headers(exchange, last.node_id if last else ""))
    answer = await exchange.stream(internal)
    completion_id = ("chatcmpl-" if chat else "cmpl-") + exchange.request_id
    first = (
        answer.first if answer.first is not None else TextChunk(exchange.request_id, "", FinishReason.STOP)
    )
    encoder = (out.ChatChunks if chat else out.CompletionChunks)(
        completion_id,
        first.created or int(time.time()),
        first.model or exchange.model,
        include_usage,
        logprobs,
    )
    return StreamingAnswer(
        encoded(
            answer,
            lambda chunk: encoder.events(chunk, False),
            lambda err: (out.sse_error(err),),
            start=encoder.events(first, True) if answer.first is None else (),
            end=lambda: (out.SSE_DONE,),
        ),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **answer_headers(exchange, first.node_id)},
    )


def openai_routes(parts: BalancerParts) -> Handlers:
    """``/v1``: chat and text completions, embeddings, audio, images and models."""
    plane = parts.plane

    async def chat_completions(request: Request) -> Response:
        async with plane.open(CHAT, door(request)) as exchange:
            body = cv.parse_body(ChatCompletionBody, await request.body())
            usage = bool(body.stream_options and body.stream_options.include_usage)
            internal = cv.chat_request(body, request_id(request))
            return await text_answer(exchange, internal, bool(body.stream), usage, chat=True)

    async def completions(request: Request) -> Response:
        async with plane.open(COMPLETE, door(request)) as exchange:
            body = cv.parse_body(CompletionBody, await request.body())
            usage = bool(body.stream_options and body.stream_options.include_usage)
            internal = cv.complete_request(body, request_id(request))
            return await text_answer(exchange, internal, bool(body.stream), usage, chat=False)

    async def embeddings(request: Request) -> Response:
        async with plane.open(EMBED, door(request)) as exchange:
            body = cv.parse_body(EmbeddingBody, await request.body())
            result = await exchange.unary(cv.embed_request(body, request_id(request)))
            payload = out.embeddings_json(result, exchange.model, body.encoding_format)
            return json_response(payload, answer_headers(exchange, result.node_id))

    async def transcriptions(request: Request) -> Response:
        async with plane.open(TRANSCRIBE, door(request)) as exchange:
            async with request.form(max_files=2, max_fields=MAX_FORM_FIELDS) as form:
                audio, filename = await cv.form_file(form, "file")
                internal = cv.transcribe_request(form, audio, filename, request_id(request))
                fmt = parse_format(cv.form_text(form, "response_format"))
            transcript = await exchange.unary(internal)
            text, content_type = render(transcript, fmt)
            return Response(
                text.encode(), media_type=content_type, headers=answer_headers(exchange, transcript.node_id)
            )

    async def speech(request: Request) -> Response:
        async with plane.open(SPEAK, door(request)) as exchange:
            internal = cv.speak_request(cv.parse_body(SpeechBody, await request.body()), request_id(request))
            audio = await exchange.stream(internal)
            if audio.first is None:
                raise LlmlbError(ErrorCode.INTERNAL, "the node returned no audio")
            return StreamingAnswer(
                encoded(audio, lambda chunk: (chunk.data,) if chunk.data else (), lambda err: ()),
                media_type=out.AUDIO_CONTENT_TYPES[internal.format],
                headers=answer_headers(exchange),
            )

    async def images(
        exchange: Exchange[GenerateImageRequest, GenerateImageResponse], internal: GenerateImageRequest
    ) -> Response:
        result = await exchange.unary(internal)
        return json_response(
            out.images_json(result, int(time.time())), answer_headers(exchange, result.node_id)
        )

    async def image_generations(request: Request) -> Response:
        async with plane.open(IMAGE, door(request)) as exchange:
            body = cv.parse_body(ImageGenerationBody, await request.body())
            return await images(exchange, cv.generate_image_request(body, request_id(request)))

    def image_form_route(operation: ImageOperation) -> Callable[[Request], Awaitable[Response]]:
        async def image_form(request: Request) -> Response:
            async with plane.open(IMAGE, door(request)) as exchange:
                async with request.form(max_files=4, max_fields=MAX_FORM_FIELDS) as form:
                    image, _ = await cv.form_file(form, "image", "image[]")
                    mask, _ = await cv.form_file(form, "mask", required=False)
                    internal = cv.image_form_request(form, operation, image, mask, request_id(request))
                return await images(exchange, internal)

        image_form.__name__ = f"image_{operation.value}"
        return image_form

    async def list_models(request: Request) -> Response:
        return json_response(openai_model_list_json(await control.list_models(parts)))

    async def get_model(request: Request) -> Response:
        view = await control.get_model(parts, request.path_params["model_id"])
        return json_response(openai_model_json(view))

    async def delete_model(request: Request) -> Response:
        return json_response(deleted_json(await control.delete_model(parts, request.path_params["model_id"])))

    return {
        "chat_completions": chat_completions,
        "completions": completions,
        "embeddings": embeddings,
        "transcriptions": transcriptions,
        "speech": speech,
        "image_generations": image_generations,
        "image_edits": image_form_route(ImageOperation.EDIT),
        "image_variations": image_form_route(ImageOperation.VARIATION),
        "models": list_models,
        "model": get_model,
        "delete_model": delete_model,
    }
