"""The OpenAI-compatible routes under ``/v1``: parse, admit, call the router, answer in OpenAI's shapes.

Thin on purpose: conversion lives in ``openai_requests`` and ``openai_answers``; admission, metrics
and access in ``balancer.edge`` (shared with the gRPC door); routing and retries in
``balancer.router``. A streamed answer whose error comes before its first chunk is a plain JSON error
with its status.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import structlog
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import Response

from balancer import control
from balancer.edge.deadline import REQUEST_TIMEOUT_HEADER, header_timeout
from balancer.edge.observe import Call, Observer
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
from balancer.http.streaming import StreamingAnswer, closing, first_item, unless_disconnected
from balancer.parts import BalancerParts
from common import tracing
from common.errors import ErrorCode, LlmlbError
from common.inference import (
    AudioChunk,
    FinishReason,
    GenerateImageRequest,
    ImageOperation,
    TextChunk,
)
from common.transcript_formats import parse_format, render

log = structlog.get_logger(__name__)
T = TypeVar("T")

DOOR = "http"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
MAX_FORM_FIELDS = 64
Endpoint = Callable[[Request], Awaitable[Response]]


def request_id(request: Request) -> str:
    """The caller's ``X-Request-Id``, checked at admission like the gRPC door's ``request_id`` field."""
    return request.headers.get("x-request-id", "")


def request_timeout(request: Request) -> float | None:
    """The caller's ``X-Request-Timeout`` (``balancer.edge.deadline``): the gRPC deadline's twin."""
    return header_timeout(request.headers.get(REQUEST_TIMEOUT_HEADER))


def json_response(payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(out.dumps(payload), media_type="application/json", headers=headers)


def door_observer(parts: BalancerParts) -> Observer:
    """The HTTP door's observer: metrics, the usage counter, history and access log (``parts.sinks``), and
    the callers' limits."""
    return Observer(parts.metrics, parts.labels, parts.sinks, parts.limits)


def observed(
    observer: Observer, route: str
) -> Callable[[Callable[[Request, Call], Awaitable[Response]]], Endpoint]:
    """Records each request's outcome and latency; streams record theirs when they end."""

    def wrap(handler: Callable[[Request, Call], Awaitable[Response]]) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            call = observer.call(
                DOOR,
                route,
                tracing.from_headers(request.headers),
                method=f"{request.method} {request.url.path}",
            )
            try:
                with tracing.current(call.span):
                    response = await handler(request, call)
            except BaseException as exc:
                await observer.failed(call, exc)
                raise
            if call.headers:  # a limited key's rate-limit headers
                response.headers.update(dict(call.headers))
            if not isinstance(response, StreamingAnswer):
                call.done("ok")
            return response

        endpoint.__name__ = handler.__name__
        return endpoint

    return wrap


async def _text_events(
    call: Call,
    first: TextChunk,
    chunks: AsyncIterator[TextChunk],
    encoder: out.ChatChunks | out.CompletionChunks,
) -> AsyncGenerator[bytes, None]:
    code = ErrorCode.CANCELLED.value  # unless the stream runs to its end or fails
    try:
        async with closing(chunks):
            if first.usage is not None:
                call.tokens(first.usage, first.node_id)
            for event in encoder.events(first, True):
                yield event
            async for chunk in chunks:
                if chunk.usage is not None:
                    call.tokens(chunk.usage, chunk.node_id)
                for event in encoder.events(chunk, False):
                    yield event
        yield out.SSE_DONE
        code = "ok"
    except LlmlbError as err:
        code = err.code.value
        log.info("http.stream_failed", route=call.route, code=code, error=err.message)
        yield out.sse_error(err)
    except Exception as exc:
        code = ErrorCode.INTERNAL.value
        log.exception("http.stream_failed", route=call.route, error=repr(exc))
        yield out.sse_error(LlmlbError(ErrorCode.INTERNAL, "internal error; see the server log"))
    finally:
        call.done(code)


async def _audio_bytes(
    call: Call, first: AudioChunk, chunks: AsyncIterator[AudioChunk]
) -> AsyncGenerator[bytes, None]:
    code = ErrorCode.CANCELLED.value
    try:
        async with closing(chunks):
            if first.data:
                yield first.data
            async for chunk in chunks:
                if chunk.data:
                    yield chunk.data
        code = "ok"
    except LlmlbError as err:  # the status is sent already: the audio just ends early
        code = err.code.value
        log.warning("http.stream_failed", route=call.route, code=code, error=err.message)
    except Exception as exc:
        code = ErrorCode.INTERNAL.value
        log.exception("http.stream_failed", route=call.route, error=repr(exc))
    finally:
        call.done(code)


async def _file(form: FormData, *names: str, required: bool = True) -> tuple[bytes, str]:
    for name in names:
        value = form.get(name)
        if isinstance(value, UploadFile):
            return await value.read(), value.filename or ""
        if value is not None:
            raise cv.invalid(f"{name} must be a file (multipart/form-data upload)")
    if required:
        raise cv.invalid(f"missing required file: {names[0]!r} (send multipart/form-data)")
    return b"", ""


def openai_routes(parts: BalancerParts) -> Handlers:
    """``/v1``: chat and text completions, embeddings, audio, images and models."""
    routing = parts.router
    observer = door_observer(parts)

    async def text_answer(
        request: Request,
        call: Call,
        answer: Callable[[], AsyncIterator[TextChunk]],
        whole: Callable[[], Awaitable[list[TextChunk]]],
        *,
        rid: str,
        model: str,
        stream: bool,
        include_usage: bool,
        chat: bool,
        logprobs: bool = False,
    ) -> Response:
        completion_id = ("chatcmpl-" if chat else "cmpl-") + rid
        if not stream:
            chunks_whole = await unless_disconnected(request.receive, whole())
            choices, last = out.join_choices(chunks_whole)
            usage = out.usage_of(chunks_whole)
            if usage is not None:
                call.tokens(usage, last.node_id if last else "")
            created = last.created if last and last.created else int(time.time())
            shown = last.model if last and last.model else model
            render = out.chat_completion_json if chat else out.text_completion_json
            headers = {"x-request-id": rid, "x-llmlb-node": last.node_id if last else ""}
            return json_response(render(completion_id, created, shown, choices, usage, logprobs), headers)
        chunks = answer()
        first = await first_item(chunks, request.receive)
        call.first_chunk()
        if first is None:
            first = TextChunk(rid, "", FinishReason.STOP)
        created = first.created or int(time.time())
        shown = first.model or model
        encoder = (out.ChatChunks if chat else out.CompletionChunks)(
            completion_id, created, shown, include_usage, logprobs
        )
        return StreamingAnswer(
            _text_events(call, first, chunks, encoder),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, "x-request-id": rid, "x-llmlb-node": first.node_id},
        )

    @observed(observer, "chat")
    async def chat_completions(request: Request, call: Call) -> Response:
        timeout = request_timeout(request)
        body = cv.parse_body(ChatCompletionBody, await request.body())
        internal = await observer.admit(call, cv.chat_request(body, request_id(request)))
        rid = internal.request_id
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await text_answer(
            request,
            call,
            lambda: routing.chat(internal, timeout=timeout),
            lambda: routing.chat_whole(internal, timeout=timeout),
            rid=rid,
            model=internal.model,
            stream=bool(body.stream),
            include_usage=include_usage,
            chat=True,
            logprobs=internal.params.logprobs,
        )

    @observed(observer, "complete")
    async def completions(request: Request, call: Call) -> Response:
        timeout = request_timeout(request)
        body = cv.parse_body(CompletionBody, await request.body())
        internal = await observer.admit(call, cv.complete_request(body, request_id(request)))
        rid = internal.request_id
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await text_answer(
            request,
            call,
            lambda: routing.complete(internal, timeout=timeout),
            lambda: routing.complete_whole(internal, timeout=timeout),
            rid=rid,
            model=internal.model,
            stream=bool(body.stream),
            include_usage=include_usage,
            chat=False,
            logprobs=internal.params.logprobs,
        )

    @observed(observer, "embed")
    async def embeddings(request: Request, call: Call) -> Response:
        timeout = request_timeout(request)
        body = cv.parse_body(EmbeddingBody, await request.body())
        internal = await observer.admit(call, cv.embed_request(body, request_id(request)))
        rid = internal.request_id
        result = await unless_disconnected(request.receive, routing.embed(internal, timeout=timeout))
        call.tokens(result.usage)
        headers = {"x-request-id": rid, "x-llmlb-node": result.node_id}
        return json_response(out.embeddings_json(result, internal.model, body.encoding_format), headers)

    @observed(observer, "transcribe")
    async def transcriptions(request: Request, call: Call) -> Response:
        timeout = request_timeout(request)
        async with request.form(max_files=2, max_fields=MAX_FORM_FIELDS) as form:
            audio, filename = await _file(form, "file")
            rid = request_id(request)
            internal = await observer.admit(call, cv.transcribe_request(form, audio, filename, rid))
            rid = internal.request_id
            fmt = parse_format(cv.form_text(form, "response_format"))
        transcript = await unless_disconnected(request.receive, routing.transcribe(internal, timeout=timeout))
        text, content_type = render(transcript, fmt)
        headers = {"x-request-id": rid, "x-llmlb-node": transcript.node_id}
        return Response(text.encode(), media_type=content_type, headers=headers)

    @observed(observer, "speak")
    async def speech(request: Request, call: Call) -> Response:
        timeout = request_timeout(request)
        body = cv.parse_body(SpeechBody, await request.body())
        internal = await observer.admit(call, cv.speak_request(body, request_id(request)))
        rid = internal.request_id
        chunks = routing.speak(internal, timeout=timeout)
        first = await first_item(chunks, request.receive)
        call.first_chunk()
        if first is None:
            raise LlmlbError(ErrorCode.INTERNAL, "the node returned no audio")
        return StreamingAnswer(
            _audio_bytes(call, first, chunks),
            media_type=out.AUDIO_CONTENT_TYPES[internal.format],
            headers={"x-request-id": rid},
        )

    async def image_answer(request: Request, internal: GenerateImageRequest, rid: str) -> Response:
        timeout = request_timeout(request)
        result = await unless_disconnected(
            request.receive, routing.generate_images(internal, timeout=timeout)
        )
        headers = {"x-request-id": rid, "x-llmlb-node": result.node_id}
        return json_response(out.images_json(result, int(time.time())), headers)

    @observed(observer, "image")
    async def image_generations(request: Request, call: Call) -> Response:
        body = cv.parse_body(ImageGenerationBody, await request.body())
        internal = await observer.admit(call, cv.generate_image_request(body, request_id(request)))
        return await image_answer(request, internal, internal.request_id)

    def image_form_route(operation: ImageOperation) -> Callable[[Request, Call], Awaitable[Response]]:
        async def image_form(request: Request, call: Call) -> Response:
            async with request.form(max_files=4, max_fields=MAX_FORM_FIELDS) as form:
                image, _ = await _file(form, "image", "image[]")
                mask, _ = await _file(form, "mask", required=False)
                internal = await observer.admit(
                    call, cv.image_form_request(form, operation, image, mask, request_id(request))
                )
            return await image_answer(request, internal, internal.request_id)

        image_form.__name__ = f"image_{operation.value}"
        return image_form

    async def list_models(request: Request) -> Response:
        return json_response(openai_model_list_json(await control.list_models(parts)))

    async def get_model(request: Request) -> Response:
        view = await control.get_model(parts, request.path_params["model_id"])
        return json_response(openai_model_json(view))

    async def delete_model(request: Request) -> Response:
        return json_response(deleted_json(await control.delete_model(parts, request.path_params["model_id"])))

    image = observed(observer, "image")
    return {
        "chat_completions": chat_completions,
        "completions": completions,
        "embeddings": embeddings,
        "transcriptions": transcriptions,
        "speech": speech,
        "image_generations": image_generations,
        "image_edits": image(image_form_route(ImageOperation.EDIT)),
        "image_variations": image(image_form_route(ImageOperation.VARIATION)),
        "models": list_models,
        "model": get_model,
        "delete_model": delete_model,
    }
