"""OpenAI JSON <-> the internal request and answer types of ``common.inference``; pure functions.

Requests arrive as ``schemas`` models (or multipart form fields) and leave as ``common.inference``
dataclasses; answers go the other way as plain dicts shaped exactly like OpenAI's.
"""

from __future__ import annotations

import array
import base64
import json
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from balancer.http.schemas import (
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    ImageGenerationBody,
    SpeechBody,
)
from common.errors import ErrorCode, LlmlbError
from common.inference import (
    AudioFormat,
    ChatMessage,
    ChatRequest,
    CompleteRequest,
    EmbedRequest,
    EmbedResponse,
    FinishReason,
    GenerateImageRequest,
    GenerateImageResponse,
    ImageOperation,
    SamplingParams,
    SpeakRequest,
    TextChunk,
    TranscribeRequest,
    Usage,
)
from common.model_id import normalize_model_id

B = TypeVar("B", bound=BaseModel)

# Legacy completions stop after 16 tokens when max_tokens is not given, as OpenAI's do.
COMPLETION_DEFAULT_MAX_TOKENS = 16
SPEECH_MAX_INPUT_CHARS = 4096
SPEECH_FORMATS = {"wav": AudioFormat.WAV, "pcm": AudioFormat.PCM}
AUDIO_CONTENT_TYPES = {AudioFormat.WAV: "audio/wav", AudioFormat.PCM: "audio/pcm"}
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "stop"}


def invalid(message: str) -> LlmlbError:
    return LlmlbError(ErrorCode.INVALID_REQUEST, message)


def dumps(value: Any) -> bytes:
    """Compact JSON, UTF-8 as is (no ``\\u`` escapes for non-ASCII text)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


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
    return f"invalid value for {where!r}: {first['msg']}" if where else first["msg"]


def parse_body(schema: type[B], body: bytes) -> B:
    """``body`` (JSON bytes) as ``schema``; any parse or type error is ``invalid_request``."""
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise invalid(validation_message(exc)) from None


def model_id(raw: str) -> str:
    """The normal form of a model id a request names; ``invalid_model_id`` for a bad one."""
    return normalize_model_id(raw)


# -- requests ----------------------------------------------------------------------------------------


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _refuse_unsupported(body: ChatCompletionBody | CompletionBody) -> None:
    if body.n not in (None, 1):
        raise invalid(f"n must be 1: one choice per request is supported, got {body.n}")
    if body.logprobs not in (None, False, 0):
        raise invalid("logprobs are not supported")


def _sampling(body: ChatCompletionBody | CompletionBody, max_tokens: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=_stop(body.stop),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
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
    _refuse_unsupported(body)
    if body.tools:
        raise invalid("tools are not supported")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise invalid("response_format: only {'type': 'text'} is supported")
    messages = tuple(
        ChatMessage(
            role="system" if m.role == "developer" else m.role,  # OpenAI's newer name for system
            content=_message_text(i, m.content),
            name=m.name or "",
        )
        for i, m in enumerate(body.messages)
    )
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return ChatRequest(
        model=model_id(body.model),
        messages=messages,
        params=_sampling(body, max_tokens),
        request_id=request_id,
        user=body.user or "",
    )


def complete_request(body: CompletionBody, request_id: str) -> CompleteRequest:
    """An OpenAI (legacy) completion body as a ``CompleteRequest``."""
    _refuse_unsupported(body)
    if body.best_of not in (None, 1):
        raise invalid(f"best_of must be 1, got {body.best_of}")
    if body.suffix:
        raise invalid("suffix is not supported")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise invalid(f"prompt: one prompt per request is supported, got {len(prompt)}")
        prompt = prompt[0]
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    return CompleteRequest(
        model=model_id(body.model),
        prompt=prompt,
        params=_sampling(body, max_tokens),
        request_id=request_id,
        echo=bool(body.echo),
        user=body.user or "",
    )


def embed_request(body: EmbeddingBody, request_id: str) -> EmbedRequest:
    texts = (body.input,) if isinstance(body.input, str) else tuple(body.input)
    return EmbedRequest(
        model=model_id(body.model),
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
    if len(body.input) > SPEECH_MAX_INPUT_CHARS:
        raise invalid(f"input has {len(body.input)} characters; the limit is {SPEECH_MAX_INPUT_CHARS}")
    return SpeakRequest(
        model=model_id(body.model),
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
        model=model_id(form_text(form, "model", required=True)),
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
        model=model_id(body.model),
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
        model=model_id(form_text(form, "model", required=True)),
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


# -- answers -----------------------------------------------------------------------------------------


def usage_json(usage: Usage | None) -> dict[str, int]:
    usage = usage or Usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def finish_reason(reason: FinishReason | None) -> str:
    return _FINISH.get(reason, "stop") if reason is not None else "stop"


def chat_completion_json(
    completion_id: str, created: int, model: str, text: str, last: TextChunk | None
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` from the joined text and the stream's last chunk."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(last.finish_reason if last else None),
            }
        ],
        "usage": usage_json(last.usage if last else None),
        "system_fingerprint": None,
    }


def text_completion_json(
    completion_id: str, created: int, model: str, text: str, last: TextChunk | None
) -> dict[str, Any]:
    """A non-streamed ``text_completion``."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason(last.finish_reason if last else None),
            }
        ],
        "usage": usage_json(last.usage if last else None),
        "system_fingerprint": None,
    }


class ChatChunks:
    """Encodes one streamed chat answer as ``chat.completion.chunk`` server-sent events."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._base: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self._include_usage = include_usage

    def _event(self, delta: dict[str, str], finish: str | None) -> bytes:
        chunk = {
            **self._base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self._include_usage:
            chunk["usage"] = None  # OpenAI's shape: null on every chunk but the usage one
        return sse(chunk)

    def events(self, chunk: TextChunk, first: bool) -> list[bytes]:
        """The events for one internal chunk; the first carries ``role: assistant``."""
        out = []
        if first:
            out.append(self._event({"role": "assistant", "content": ""}, None))
        if chunk.delta:
            out.append(self._event({"content": chunk.delta}, None))
        if chunk.finish_reason is not None:
            out.append(self._event({}, finish_reason(chunk.finish_reason)))
            if self._include_usage:
                out.append(sse({**self._base, "choices": [], "usage": usage_json(chunk.usage)}))
        return out


class CompletionChunks:
    """Encodes one streamed completion as ``text_completion`` server-sent events."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._base: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self._include_usage = include_usage

    def events(self, chunk: TextChunk, first: bool) -> list[bytes]:
        del first  # completions have no role event
        if not chunk.delta and chunk.finish_reason is None:
            return []
        finish = finish_reason(chunk.finish_reason) if chunk.finish_reason is not None else None
        event: dict[str, Any] = {
            **self._base,
            "choices": [{"index": 0, "text": chunk.delta, "logprobs": None, "finish_reason": finish}],
        }
        if self._include_usage:
            event["usage"] = None
        out = [sse(event)]
        if finish is not None and self._include_usage:
            out.append(sse({**self._base, "choices": [], "usage": usage_json(chunk.usage)}))
        return out


def sse(payload: Any) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(error: LlmlbError) -> bytes:
    """An error after the stream began: OpenAI's clients raise it from the ``error`` event."""
    return sse(error.to_openai())


def _base64_floats(vector: tuple[float, ...]) -> str:
    packed = array.array("f", vector)
    if sys.byteorder != "little":  # OpenAI's base64 embeddings are little-endian float32
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embeddings_json(result: EmbedResponse, model: str, encoding_format: str | None) -> dict[str, Any]:
    encode = _base64_floats if encoding_format == "base64" else list
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(vector)}
            for i, vector in enumerate(result.data)
        ],
        "model": result.model or model,
        "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.total_tokens},
    }


def images_json(result: GenerateImageResponse, created: int) -> dict[str, Any]:
    return {
        "created": created,
        "data": [
            {"b64_json": base64.b64encode(image.png).decode("ascii"), "revised_prompt": image.revised_prompt}
            for image in result.images
        ],
    }
