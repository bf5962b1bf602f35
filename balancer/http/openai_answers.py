"""The internal answer types of ``common.inference`` -> OpenAI JSON and server-sent events.

Answers leave as plain dicts (or SSE bytes) shaped exactly like OpenAI's, made by pure functions; at the
end, the HTTP answers the door sends for each route, from the inference plane's ``Answer`` (the HTTP
door's encoders, as ``common.inference_pb`` holds the gRPC door's).
"""

from __future__ import annotations

import array
import base64
import codecs
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response

from balancer.edge.plane import Answer
from balancer.http.streaming import StreamingAnswer, encoded
from balancer.http.transcript_formats import ResponseFormat as TranscriptFormat
from balancer.http.transcript_formats import render
from common.errors import ErrorCode, LlmlbError
from common.inference import (
    AudioChunk,
    AudioFormat,
    ChatRequest,
    CompleteRequest,
    EmbedRequest,
    EmbedResponse,
    FinishReason,
    GenerateImageRequest,
    GenerateImageResponse,
    SpeakRequest,
    TextChunk,
    TokenLogprob,
    ToolCall,
    TranscribeRequest,
    Transcript,
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


def joined_tool_calls(pieces: Iterable[ToolCall]) -> tuple[ToolCall, ...]:
    """Whole calls from streamed pieces (ids and names on first pieces), in index order."""
    calls: dict[int, ToolCall] = {}
    for piece in pieces:
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


# -- log-probabilities ---------------------------------------------------------------------------------


def token_logprob_json(entry: TokenLogprob) -> dict[str, Any]:
    """One token of chat's ``logprobs.content``."""
    return {
        "token": entry.token,
        "logprob": entry.logprob,
        "bytes": list(entry.bytes),
        "top_logprobs": [
            {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in entry.top_logprobs
        ],
    }


def chat_logprobs_json(entries: Sequence[TokenLogprob], asked: bool) -> dict[str, Any] | None:
    """Chat's ``choices[i].logprobs``: null unless asked for."""
    if not asked:
        return None
    return {"content": [token_logprob_json(e) for e in entries], "refusal": None}


class TextOffsets:
    """Where each token starts in a choice's text, in characters (legacy completions' ``text_offset``).

    Counted from the tokens' own bytes: an echoed prompt would shift them, which is why echo and
    logprobs are refused together (``CompleteRequest.validate``).
    """

    def __init__(self) -> None:
        self._chars = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, data: bytes) -> int:
        """The offset of the token whose bytes are ``data``; a token inside a character shares its start."""
        offset = self._chars
        self._chars += len(self._decoder.decode(data))
        return offset


def completion_logprobs_json(
    entries: Sequence[TokenLogprob], offsets: TextOffsets, asked: bool
) -> dict[str, Any] | None:
    """A legacy completion's ``choices[i].logprobs``: parallel lists; null unless asked for."""
    if not asked:
        return None
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        "text_offset": [offsets.next(e.bytes) for e in entries],
    }


# -- whole answers -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Choice:
    """One choice of a whole answer, joined from its chunks."""

    index: int
    pieces: list[str] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)  # pieces, as streamed

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def join_choices(chunks: Sequence[TextChunk]) -> tuple[list[Choice], TextChunk | None]:
    """The choices of a whole answer, in index order, and the stream's last chunk (None if empty)."""
    choices: dict[int, Choice] = {}
    for chunk in chunks:
        choice = choices.setdefault(chunk.index, Choice(chunk.index))
        choice.pieces.append(chunk.delta)
        choice.logprobs.extend(chunk.logprobs)
        choice.tool_calls.extend(chunk.tool_calls)
        if chunk.finish_reason is not None:
            choice.finish_reason = chunk.finish_reason
    return [choices[i] for i in sorted(choices)], (chunks[-1] if chunks else None)


def usage_of(chunks: Sequence[TextChunk]) -> Usage | None:
    """The usage of all choices: on the stream's last chunk (the last that has one, to be lenient)."""
    return next((c.usage for c in reversed(chunks) if c.usage is not None), None)


def chat_completion_json(
    completion_id: str,
    created: int,
    model: str,
    choices: Sequence[Choice],
    usage: Usage | None,
    logprobs: bool = False,
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` from the joined choices; ``logprobs``: whether they were asked."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": chat_message_json(c.text, joined_tool_calls(c.tool_calls)),
                "logprobs": chat_logprobs_json(c.logprobs, logprobs),
                "finish_reason": finish_reason(c.finish_reason),
            }
            for c in choices or [Choice(0)]
        ],
        "usage": usage_json(usage),
        "system_fingerprint": None,
    }


def text_completion_json(
    completion_id: str,
    created: int,
    model: str,
    choices: Sequence[Choice],
    usage: Usage | None,
    logprobs: bool = False,
) -> dict[str, Any]:
    """A non-streamed ``text_completion``."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs_json(c.logprobs, TextOffsets(), logprobs),
                "finish_reason": finish_reason(c.finish_reason),
            }
            for c in choices or [Choice(0)]
        ],
        "usage": usage_json(usage),
        "system_fingerprint": None,
    }


# -- streamed answers ----------------------------------------------------------------------------------


class ChatChunks:
    """Encodes one streamed chat answer as ``chat.completion.chunk`` server-sent events.

    Each choice (``index``) begins with a ``role: assistant`` event and ends with its finish_reason; the
    usage event, when asked for, follows the chunk that carries the usage (the stream's last).
    """

    def __init__(
        self, completion_id: str, created: int, model: str, include_usage: bool, logprobs: bool = False
    ) -> None:
        self._base: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self._include_usage = include_usage
        self._logprobs = logprobs
        self._started: set[int] = set()

    def _event(
        self,
        index: int,
        delta: dict[str, Any],
        finish: str | None,
        logprobs: dict[str, Any] | None = None,
    ) -> bytes:
        chunk = {
            **self._base,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }
        if self._include_usage:
            chunk["usage"] = None  # OpenAI's shape: null on every chunk but the usage one
        return sse(chunk)

    def events(self, chunk: TextChunk, first: bool) -> list[bytes]:
        """The events for one internal chunk; a choice's first carries ``role: assistant``."""
        del first  # each choice's first chunk is known by its index
        out = []
        index = chunk.index
        if index not in self._started:
            self._started.add(index)
            out.append(self._event(index, {"role": "assistant", "content": ""}, None))
        if chunk.delta or chunk.logprobs:
            logprobs = chat_logprobs_json(chunk.logprobs, self._logprobs)
            out.append(self._event(index, {"content": chunk.delta}, None, logprobs))
        if chunk.tool_calls:
            # one entry per call, as OpenAI sends: a chunk's pieces of one call are joined
            calls = [tool_call_delta_json(p) for p in joined_tool_calls(chunk.tool_calls)]
            out.append(self._event(index, {"tool_calls": calls}, None))
        if chunk.finish_reason is not None:
            out.append(self._event(index, {}, finish_reason(chunk.finish_reason)))
        if chunk.usage is not None and self._include_usage:
            out.append(sse({**self._base, "choices": [], "usage": usage_json(chunk.usage)}))
        return out


class CompletionChunks:
    """Encodes one streamed completion as ``text_completion`` server-sent events."""

    def __init__(
        self, completion_id: str, created: int, model: str, include_usage: bool, logprobs: bool = False
    ) -> None:
        self._base: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self._include_usage = include_usage
        self._logprobs = logprobs
        self._offsets: dict[int, TextOffsets] = {}

    def events(self, chunk: TextChunk, first: bool) -> list[bytes]:
        del first  # completions have no role event
        offsets = self._offsets.setdefault(chunk.index, TextOffsets())
        out = []
        if chunk.delta or chunk.logprobs or chunk.finish_reason is not None:
            finish = finish_reason(chunk.finish_reason) if chunk.finish_reason is not None else None
            logprobs = completion_logprobs_json(chunk.logprobs, offsets, self._logprobs)
            choice = {"index": chunk.index, "text": chunk.delta, "logprobs": logprobs}
            event: dict[str, Any] = {**self._base, "choices": [{**choice, "finish_reason": finish}]}
            if self._include_usage:
                event["usage"] = None
            out.append(sse(event))
        if chunk.usage is not None and self._include_usage:
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


# -- the HTTP answers: the inference plane's ``Answer`` as the response the door sends ----------------

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def answer_headers(answer: Answer[Any, Any, Any], node_id: str | None = None) -> dict[str, str]:
    """``x-request-id``, ``x-llmlb-node`` (unless None) and a limited key's rate-limit headers."""
    node = {} if node_id is None else {"x-llmlb-node": node_id}
    return {"x-request-id": answer.request_id, **node, **dict(answer.headers)}


def json_response(payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(payload), media_type="application/json", headers=headers)


def text_answer(chat: bool) -> Callable[[Answer[ChatRequest | CompleteRequest, TextChunk, bool]], Response]:
    """A chat or text completion: one JSON object, or its chunks as server-sent events (kept: whether
    a stream ends with a usage chunk)."""
    prefix = "chatcmpl-" if chat else "cmpl-"

    def encode(answer: Answer[ChatRequest | CompleteRequest, TextChunk, bool]) -> Response:
        logprobs = answer.request.params.logprobs
        if answer.stream is None:
            choices, last = join_choices(answer.items)
            created = last.created if last and last.created else int(time.time())
            shown = last.model if last and last.model else answer.model
            render = chat_completion_json if chat else text_completion_json
            payload = render(
                prefix + answer.request_id, created, shown, choices, usage_of(answer.items), logprobs
            )
            return json_response(payload, answer_headers(answer, last.node_id if last else ""))
        stream = answer.stream
        first = (
            stream.first if stream.first is not None else TextChunk(answer.request_id, "", FinishReason.STOP)
        )
        created, model = first.created or int(time.time()), first.model or answer.model
        chunks = (ChatChunks if chat else CompletionChunks)(
            prefix + answer.request_id, created, model, answer.keep, logprobs
        )
        events = encoded(
            stream,
            lambda chunk: chunks.events(chunk, False),
            lambda err: (sse_error(err),),
            start=chunks.events(first, True) if stream.first is None else (),
            end=lambda: (SSE_DONE,),
        )
        headers = {**SSE_HEADERS, **answer_headers(answer, first.node_id)}
        return StreamingAnswer(events, media_type="text/event-stream", headers=headers)

    return encode


def embeddings_answer(answer: Answer[EmbedRequest, EmbedResponse, str | None]) -> Response:
    payload = embeddings_json(answer.one, answer.model, answer.keep)
    return json_response(payload, answer_headers(answer, answer.one.node_id))


def transcript_answer(answer: Answer[TranscribeRequest, Transcript, TranscriptFormat]) -> Response:
    text, content_type = render(answer.one, answer.keep)
    return Response(
        text.encode(), media_type=content_type, headers=answer_headers(answer, answer.one.node_id)
    )


def speech_answer(answer: Answer[SpeakRequest, AudioChunk, None]) -> Response:
    audio = answer.stream
    if audio is None or audio.first is None:
        raise LlmlbError(ErrorCode.INTERNAL, "the node returned no audio")
    return StreamingAnswer(
        encoded(audio, lambda chunk: (chunk.data,) if chunk.data else (), lambda err: ()),
        media_type=AUDIO_CONTENT_TYPES[answer.request.format],
        headers=answer_headers(answer),
    )


def images_answer(answer: Answer[GenerateImageRequest, GenerateImageResponse, None]) -> Response:
    return json_response(
        images_json(answer.one, int(time.time())), answer_headers(answer, answer.one.node_id)
    )
