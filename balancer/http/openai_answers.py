"""The internal answer types of ``common.inference`` -> OpenAI JSON and server-sent events; pure functions.

Answers leave as plain dicts (or SSE bytes) shaped exactly like OpenAI's.
"""

from __future__ import annotations

import array
import base64
import json
import sys
from typing import Any

from common.errors import LlmlbError
from common.inference import (
    AudioFormat,
    EmbedResponse,
    FinishReason,
    GenerateImageResponse,
    TextChunk,
    ToolCall,
    Usage,
)

AUDIO_CONTENT_TYPES = {AudioFormat.WAV: "audio/wav", AudioFormat.PCM: "audio/pcm"}
_FINISH = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "stop",
    FinishReason.TOOL_CALLS: "tool_calls",
}


def dumps(value: Any) -> bytes:
    """Compact JSON, UTF-8 as is (no ``\\u`` escapes for non-ASCII text)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# -- answers -----------------------------------------------------------------------------------------


def usage_json(usage: Usage | None) -> dict[str, Any]:
    usage = usage or Usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def finish_reason(reason: FinishReason | None) -> str:
    return _FINISH.get(reason, "stop") if reason is not None else "stop"


def joined_tool_calls(chunks: list[TextChunk]) -> tuple[ToolCall, ...]:
    """The whole calls of an answer, from the pieces its chunks carry (ids and names on first pieces)."""
    calls: dict[int, ToolCall] = {}
    for chunk in chunks:
        for piece in chunk.tool_calls:
            seen = calls.get(piece.index)
            if seen is None:
                calls[piece.index] = piece
            else:
                calls[piece.index] = ToolCall(
                    index=piece.index,
                    id=seen.id or piece.id,
                    name=seen.name or piece.name,
                    arguments=seen.arguments + piece.arguments,
                )
    return tuple(calls[i] for i in sorted(calls))


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    """A whole call, as in ``message.tool_calls``."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_delta_json(piece: ToolCall) -> dict[str, Any]:
    """A streamed piece, as in ``delta.tool_calls``: id, type and name on a call's first piece only."""
    if piece.id or piece.name:
        return {
            "index": piece.index,
            "id": piece.id,
            "type": "function",
            "function": {"name": piece.name, "arguments": piece.arguments},
        }
    return {"index": piece.index, "function": {"arguments": piece.arguments}}


def chat_message_json(text: str, tool_calls: tuple[ToolCall, ...] = ()) -> dict[str, Any]:
    """The assistant's ``message``: its content is null when it only called tools, as OpenAI's is."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = [tool_call_json(c) for c in tool_calls]
    return message


def chat_completion_json(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    last: TextChunk | None,
    tool_calls: tuple[ToolCall, ...] = (),
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
                "message": chat_message_json(text, tool_calls),
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

    def _event(self, delta: dict[str, Any], finish: str | None) -> bytes:
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
        if chunk.tool_calls:
            # one entry per call, as OpenAI sends: a chunk's pieces of one call are joined
            merged = joined_tool_calls([chunk])
            out.append(self._event({"tool_calls": [tool_call_delta_json(p) for p in merged]}, None))
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
