"""OpenAI JSON -> the internal request types of ``common.inference``; pure functions.

Requests arrive as ``schemas`` models (or multipart form fields) and leave as ``common.inference``
dataclasses. Model ids, request ids and the limits every door shares are checked afterwards, at the edge
(``balancer.edge.admission``); what is refused here is what only OpenAI's JSON can get wrong.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from balancer.edge.plane import Asked
from balancer.http.schemas import (
    ChatCompletionBody,
    ChatMessageBody,
    CompletionBody,
    EmbeddingBody,
    ImageGenerationBody,
    NamedToolChoice,
    SpeechBody,
)
from balancer.http.tool_requests import CHAT_TOOLS, FunctionSpec, tooling
from balancer.http.transcript_formats import ResponseFormat as TranscriptFormat
from balancer.http.transcript_formats import parse_format
from common.errors import ErrorCode, LlmlbError
from common.inference import (
    AudioFormat,
    ChatMessage,
    ChatRequest,
    CompleteRequest,
    EmbedRequest,
    GenerateImageRequest,
    ImageOperation,
    ResponseFormat,
    ResponseFormatType,
    SamplingParams,
    SpeakRequest,
    Tool,
    ToolCall,
    ToolChoice,
    TranscribeRequest,
)

B = TypeVar("B", bound=BaseModel)

# Legacy completions stop after 16 tokens when max_tokens is not given, as OpenAI's do.
COMPLETION_DEFAULT_MAX_TOKENS = 16
COMPLETION_MAX_LOGPROBS = 5  # legacy completions' ``logprobs``: at most 5 alternatives, as OpenAI's
SPEECH_FORMATS = {"wav": AudioFormat.WAV, "pcm": AudioFormat.PCM}


def invalid(message: str) -> LlmlbError:
    return LlmlbError(ErrorCode.INVALID_REQUEST, message)


# -- parsing -----------------------------------------------------------------------------------------


def _location(loc: tuple[int | str, ...]) -> str:
    # Pydantic adds the union member it tried ("str", "list[...]") to the path; users never wrote it.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float")))]
    return ".".join(parts)


def validation_message(exc: ValidationError) -> str:
    """One line naming the first offending parameter, the way OpenAI's 400s read."""
    first = exc.errors(include_url=False)[0]
    where = _location(tuple(first["loc"]))
    kind = first["type"]
    if kind == "json_invalid":
        return "the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", first["msg"]))
    if kind == "missing":
        return f"missing required parameter: {where!r}"
    if kind == "model_type":
        return "the request body must be a JSON object"
    if kind == "extra_forbidden":
        return f"unknown parameter: {where!r}"
    return f"invalid value for {where!r}: {first['msg']}" if where else first["msg"]


def parse_body(schema: type[B], body: bytes) -> B:
    """``body`` (JSON bytes) as ``schema``; any parse or type error is ``invalid_request``."""
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise invalid(validation_message(exc)) from None


# -- requests ----------------------------------------------------------------------------------------


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _logprobs(body: ChatCompletionBody | CompletionBody) -> tuple[bool, int]:
    """(logprobs, top_logprobs): chat names both; a legacy completion's ``logprobs: k`` means both."""
    if isinstance(body, ChatCompletionBody):
        return bool(body.logprobs), body.top_logprobs or 0
    if body.logprobs is None:
        return False, 0
    if not 0 <= body.logprobs <= COMPLETION_MAX_LOGPROBS:
        raise invalid(f"logprobs must be between 0 and {COMPLETION_MAX_LOGPROBS}, got {body.logprobs}")
    return True, body.logprobs


def _sampling(body: ChatCompletionBody | CompletionBody, max_tokens: int | None) -> SamplingParams:
    logprobs, top_logprobs = _logprobs(body)
    return SamplingParams(
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=1 if body.n is None else body.n,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=_stop(body.stop),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        response_format=response_format(body.response_format),
    )


def response_format(given: dict[str, Any] | None) -> ResponseFormat:
    """OpenAI's ``response_format`` as a ``ResponseFormat``; the schema itself is checked at admission."""
    if not given:
        return ResponseFormat()
    kind = given.get("type", "text")
    if kind == "text":
        return ResponseFormat()
    if kind == "json_object":
        return ResponseFormat(type=ResponseFormatType.JSON_OBJECT)
    if kind != "json_schema":
        raise invalid(
            f"response_format.type {str(kind)[:40]!r} is not supported;"
            " use 'text', 'json_object' or 'json_schema'"
        )
    spec = given.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise invalid("response_format.json_schema.schema must be a JSON Schema object")
    return ResponseFormat(
        type=ResponseFormatType.JSON_SCHEMA,
        schema=json.dumps(spec["schema"]),
        name=str(spec.get("name", "")),
        strict=bool(spec.get("strict", False)),
    )


def _tooling(body: ChatCompletionBody) -> tuple[tuple[Tool, ...], ToolChoice]:
    flat = (
        FunctionSpec(
            t.type, t.function.name, t.function.description, t.function.parameters, t.function.strict
        )
        for t in body.tools or ()
    )
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return tooling(
            flat, FunctionSpec(choice.type, choice.function.name if choice.function else None), CHAT_TOOLS
        )
    return tooling(flat, choice, CHAT_TOOLS)


def _message(index: int, m: ChatMessageBody) -> ChatMessage:
    calls = tuple(
        ToolCall(index=j, id=c.id, name=c.function.name, arguments=c.function.arguments)
        for j, c in enumerate(m.tool_calls or ())
    )
    return ChatMessage(
        role="system" if m.role == "developer" else m.role,  # OpenAI's newer name for system
        content=_message_text(index, m.content),
        name=m.name or "",
        tool_calls=calls,
        tool_call_id=m.tool_call_id or "",
    )


def _message_text(index: int, content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise invalid(
                f"messages.{index}.content: only text content parts are supported, got {part.type!r}"
            )
        texts.append(part.text)
    return "\n".join(texts)


def chat_request(body: ChatCompletionBody, request_id: str) -> ChatRequest:
    """An OpenAI chat completion body as a ``ChatRequest``."""
    messages = tuple(_message(i, m) for i, m in enumerate(body.messages))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    tools, tool_choice = _tooling(body)
    return ChatRequest(
        model=body.model,
        messages=messages,
        params=_sampling(body, max_tokens),
        request_id=request_id,
        user=body.user or "",
        prompt_cache_key=body.prompt_cache_key or "",
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )


def complete_request(body: CompletionBody, request_id: str) -> CompleteRequest:
    """An OpenAI (legacy) completion body as a ``CompleteRequest``."""
    # best_of > n asks the server to rank choices by log-probability and keep the best; not done here.
    if body.best_of not in (None, 1, body.n or 1):
        raise invalid(f"best_of must equal n (choices are not ranked here), got best_of={body.best_of}")
    if body.suffix:
        raise invalid("suffix is not supported")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise invalid(f"prompt: one prompt per request is supported, got {len(prompt)}")
        prompt = prompt[0]
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    return CompleteRequest(
        model=body.model,
        prompt=prompt,
        params=_sampling(body, max_tokens),
        request_id=request_id,
        echo=bool(body.echo),
        user=body.user or "",
        prompt_cache_key=body.prompt_cache_key or "",
    )


def embed_request(body: EmbeddingBody, request_id: str) -> EmbedRequest:
    texts = (body.input,) if isinstance(body.input, str) else tuple(body.input)
    return EmbedRequest(
        model=body.model,
        input=texts,
        request_id=request_id,
        dimensions=body.dimensions,
        user=body.user or "",
    )


def speak_request(body: SpeechBody, request_id: str) -> SpeakRequest:
    fmt = SPEECH_FORMATS.get(body.response_format or "wav")
    if fmt is None:
        raise invalid(
            f"response_format {body.response_format!r} is not supported; use 'wav' or 'pcm' "
            "(16-bit mono samples)"
        )
    if body.stream_format not in (None, "audio"):
        raise invalid(f"stream_format {body.stream_format!r} is not supported; use 'audio'")
    return SpeakRequest(
        model=body.model,
        input=body.input,
        voice=body.voice or "",
        format=fmt,
        speed=body.speed,
        request_id=request_id,
    )


def _form_text(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise invalid(f"{name} must be a text field, not a file")
    return value


def form_float(form: Mapping[str, Any], name: str) -> float | None:
    text = _form_text(form, name).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise invalid(f"{name} must be a number, got {text[:40]!r}") from None


def form_int(form: Mapping[str, Any], name: str) -> int | None:
    text = _form_text(form, name).strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise invalid(f"{name} must be an integer, got {text[:40]!r}") from None


def form_text(form: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    text = _form_text(form, name)
    if required and not text:
        raise invalid(f"missing required parameter: {name!r}")
    return text


def transcribe_request(
    form: Mapping[str, Any], audio: bytes, filename: str, request_id: str
) -> TranscribeRequest:
    """A multipart transcription form (its file already read) as a ``TranscribeRequest``."""
    if form_text(form, "stream").lower() == "true":
        raise invalid("streamed transcriptions are not supported")
    return TranscribeRequest(
        model=form_text(form, "model"),  # checked at admission, like every door's
        audio=audio,
        filename=filename,
        language=form_text(form, "language"),
        prompt=form_text(form, "prompt"),
        temperature=form_float(form, "temperature"),
        request_id=request_id,
    )


def image_size(size: str | None) -> tuple[int, int]:
    """``"1024x768"`` as (width, height); empty or ``auto``: the model's default (0, 0)."""
    if not size or size == "auto":
        return 0, 0
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise invalid(f"size must look like '512x512' or be 'auto', got {size[:40]!r}")
    return int(width), int(height)


def check_image_format(response_format: str | None) -> None:
    if response_format not in (None, "", "b64_json"):
        raise invalid(
            f"response_format {response_format!r} is not supported; images are returned as b64_json"
        )


def generate_image_request(body: ImageGenerationBody, request_id: str) -> GenerateImageRequest:
    check_image_format(body.response_format)
    width, height = image_size(body.size)
    return GenerateImageRequest(
        model=body.model,
        prompt=body.prompt,
        operation=ImageOperation.GENERATE,
        negative_prompt=body.negative_prompt or "",
        n=1 if body.n is None else body.n,
        width=width,
        height=height,
        steps=body.steps or 0,
        cfg_scale=body.cfg_scale,
        seed=body.seed,
        request_id=request_id,
    )


def image_form_request(
    form: Mapping[str, Any],
    operation: ImageOperation,
    image: bytes,
    mask: bytes,
    request_id: str,
) -> GenerateImageRequest:
    """A multipart image edit or variation form (files already read) as a ``GenerateImageRequest``."""
    check_image_format(form_text(form, "response_format"))
    width, height = image_size(form_text(form, "size"))
    n = form_int(form, "n")
    return GenerateImageRequest(
        model=form_text(form, "model"),  # checked at admission, like every door's
        prompt=form_text(form, "prompt", required=operation is ImageOperation.EDIT),
        operation=operation,
        negative_prompt=form_text(form, "negative_prompt"),
        n=1 if n is None else n,
        width=width,
        height=height,
        steps=form_int(form, "steps") or 0,
        cfg_scale=form_float(form, "cfg_scale"),
        seed=form_int(form, "seed"),
        image=image,
        mask=mask,
        request_id=request_id,
    )


async def form_file(form: FormData, *names: str, required: bool = True) -> tuple[bytes, str]:
    """The first of ``names`` that is an uploaded file: its bytes and filename."""
    for name in names:
        value = form.get(name)
        if isinstance(value, UploadFile):
            return await value.read(), value.filename or ""
        if value is not None:
            raise invalid(f"{name} must be a file (multipart/form-data upload)")
    if required:
        raise invalid(f"missing required file: {names[0]!r} (send multipart/form-data)")
    return b"", ""


# -- the door's parsers: one HTTP request, read and converted (``balancer.edge.plane.Asked``) ----------

MAX_FORM_FIELDS = 64


def request_id(request: Request) -> str:
    """The caller's ``X-Request-Id``, checked at admission like the gRPC door's ``request_id`` field."""
    return request.headers.get("x-request-id", "")


async def chat(request: Request) -> Asked[ChatRequest, bool]:
    """``POST /v1/chat/completions``; kept: whether a stream ends with a usage chunk."""
    body = parse_body(ChatCompletionBody, await request.body())
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return Asked(chat_request(body, request_id(request)), bool(body.stream), usage)


async def completion(request: Request) -> Asked[CompleteRequest, bool]:
    """``POST /v1/completions``; kept: whether a stream ends with a usage chunk."""
    body = parse_body(CompletionBody, await request.body())
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return Asked(complete_request(body, request_id(request)), bool(body.stream), usage)


async def embedding(request: Request) -> Asked[EmbedRequest, str | None]:
    """``POST /v1/embeddings``; kept: the vectors' encoding."""
    body = parse_body(EmbeddingBody, await request.body())
    return Asked(embed_request(body, request_id(request)), False, body.encoding_format)


async def speech(request: Request) -> Asked[SpeakRequest, None]:
    """``POST /v1/audio/speech``: always streamed."""
    return Asked(speak_request(parse_body(SpeechBody, await request.body()), request_id(request)), True, None)


async def transcription(request: Request) -> Asked[TranscribeRequest, TranscriptFormat]:
    """``POST /v1/audio/transcriptions`` (a multipart form); kept: the answer's format."""
    async with request.form(max_files=2, max_fields=MAX_FORM_FIELDS) as form:
        audio, filename = await form_file(form, "file")
        internal = transcribe_request(form, audio, filename, request_id(request))
        return Asked(internal, False, parse_format(form_text(form, "response_format")))


async def image_generation(request: Request) -> Asked[GenerateImageRequest, None]:
    """``POST /v1/images/generations``."""
    body = parse_body(ImageGenerationBody, await request.body())
    return Asked(generate_image_request(body, request_id(request)), False, None)


def image_form(
    operation: ImageOperation,
) -> Callable[[Request], Awaitable[Asked[GenerateImageRequest, None]]]:
    """``POST /v1/images/edits`` or ``/variations`` (multipart forms)."""

    async def parse(request: Request) -> Asked[GenerateImageRequest, None]:
        async with request.form(max_files=4, max_fields=MAX_FORM_FIELDS) as form:
            image, _ = await form_file(form, "image", "image[]")
            mask, _ = await form_file(form, "mask", required=False)
            internal = image_form_request(form, operation, image, mask, request_id(request))
        return Asked(internal, False, None)

    return parse
