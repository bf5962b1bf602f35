"""Internal answer chunks -> the Responses API's ``response`` object and its typed stream events.

One answer (one choice) becomes a ``response`` whose ``output`` holds a ``message`` item (its text as
one ``output_text`` part) and one ``function_call`` item per tool call. Streamed, the same output is
announced and filled by the typed events the official clients parse (``response.created``, ...,
``response.completed``), each with a ``sequence_number``. Pure, but for ``response_answer`` at the
end: the HTTP answer the door sends, from the inference plane's ``Answer``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response

from balancer.edge.plane import Answer
from balancer.http.openai_answers import SSE_HEADERS, answer_headers, json_response, sse
from balancer.http.responses_requests import echoed
from balancer.http.responses_schemas import ResponseCreateBody
from balancer.http.streaming import StreamingAnswer, encoded
from common.errors import ErrorCode, LlmlbError
from common.inference import ChatRequest, FinishReason, TextChunk, TokenLogprob, ToolCall, Usage


def usage_json(usage: Usage | None) -> dict[str, Any]:
    usage = usage or Usage()
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def logprobs_json(logprobs: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": list(lp.bytes),
            "top_logprobs": [
                {"token": top.token, "logprob": top.logprob, "bytes": list(top.bytes)}
                for top in lp.top_logprobs
            ],
        }
        for lp in logprobs
    ]


@dataclass(slots=True)
class _Message:
    item_id: str
    output_index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def part(self) -> dict[str, Any]:
        return {
            "type": "output_text",
            "text": "".join(self.text),
            "annotations": [],
            "logprobs": self.logprobs,
        }

    def item(self, status: str) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": [] if status == "in_progress" and not self.text else [self.part()],
        }


@dataclass(slots=True)
class _FunctionCallItem:
    """The answer's ``function_call`` output item, its arguments gathered from the tool call's pieces."""

    item_id: str
    call_id: str
    name: str
    output_index: int
    arguments: list[str] = field(default_factory=list)

    def item(self, status: str) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": self.item_id,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": "".join(self.arguments),
            "status": status,
        }


class ResponseBuilder:
    """Follows one answer's chunks, and renders the ``response`` object and the stream's events.

    ``feed`` returns the events a chunk adds (use them when streaming, or ignore them); ``response``
    renders the object at any point: ``in_progress`` before the answer ends, then ``completed`` or
    ``incomplete`` (``max_output_tokens`` reached). Text opens a ``message`` item and a tool call's
    first piece a ``function_call`` item; each item is closed when the next one opens or the answer ends.
    """

    def __init__(self, response_id: str, created_at: int, model: str, echo: dict[str, Any]) -> None:
        self.response_id = response_id
        self.created_at = created_at
        self.model = model
        self._echo = echo
        self._sequence = 0
        self._items: list[_Message | _FunctionCallItem] = []  # in output order
        self._calls: dict[int, _FunctionCallItem] = {}  # by the tool call's index in the answer
        self._open: _Message | _FunctionCallItem | None = None
        self._finish: FinishReason | None = None
        self._usage: Usage | None = None
        self._error: LlmlbError | None = None

    @property
    def finished(self) -> bool:
        """Whether the answer's last chunk (the one with a finish reason) has been fed."""
        return self._finish is not None

    @property
    def _suffix(self) -> str:
        return self.response_id.removeprefix("resp_")

    # -- the object ---------------------------------------------------------------------------------

    def _status(self) -> str:
        if self._error is not None:
            return "failed"
        if self._finish is None:
            return "in_progress"
        return "incomplete" if self._finish is FinishReason.LENGTH else "completed"

    def _output(self) -> list[dict[str, Any]]:
        done = self._finish is not None
        return [
            item.item("completed" if done or item is not self._open else "in_progress")
            for item in self._items
        ]

    def response(self) -> dict[str, Any]:
        """The ``response`` object as it stands."""
        status = self._status()
        error = None
        if self._error is not None:
            # A response's error code is one of OpenAI's few; the ``error`` event before it has ours.
            code = "rate_limit_exceeded" if self._error.code is ErrorCode.QUEUE_FULL else "server_error"
            error = {"code": code, "message": self._error.message}
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": self.model,
            "output": self._output(),
            **self._echo,
            "usage": usage_json(self._usage) if self._finish is not None else None,
        }

    # -- the events ---------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\n" + sse(event)

    def start(self) -> list[bytes]:
        """``response.created`` and ``response.in_progress``: the stream's first events."""
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    def _close(self) -> list[bytes]:
        item, self._open = self._open, None
        if isinstance(item, _Message):
            at = {"item_id": item.item_id, "output_index": item.output_index, "content_index": 0}
            part = item.part()
            return [
                self._event("response.output_text.done", **at, text=part["text"], logprobs=item.logprobs),
                self._event("response.content_part.done", **at, part=part),
                self._event(
                    "response.output_item.done", output_index=item.output_index, item=item.item("completed")
                ),
            ]
        if isinstance(item, _FunctionCallItem):
            at = {"item_id": item.item_id, "output_index": item.output_index}
            arguments = "".join(item.arguments)
            return [
                self._event(
                    "response.function_call_arguments.done", **at, name=item.name, arguments=arguments
                ),
                self._event(
                    "response.output_item.done", output_index=item.output_index, item=item.item("completed")
                ),
            ]
        return []

    def _text(self, chunk: TextChunk) -> list[bytes]:
        events: list[bytes] = []
        message = self._open
        if not isinstance(message, _Message):
            events += self._close()
            # A second message (text after a tool call) gets an id of its own.
            item_id = f"msg_{self._suffix}" + (f"_{len(self._items)}" if self._items else "")
            message = _Message(item_id, len(self._items))
            self._items.append(message)
            self._open = message
            at = {"item_id": item_id, "output_index": message.output_index}
            events += [
                self._event(
                    "response.output_item.added",
                    output_index=message.output_index,
                    item=message.item("in_progress"),
                ),
                self._event("response.content_part.added", **at, content_index=0, part=message.part()),
            ]
        logprobs = logprobs_json(chunk.logprobs)
        message.text.append(chunk.delta)
        message.logprobs += logprobs
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=message.item_id,
                output_index=message.output_index,
                content_index=0,
                delta=chunk.delta,
                logprobs=logprobs,
            )
        )
        return events

    def _call_piece(self, piece: ToolCall) -> list[bytes]:
        events: list[bytes] = []
        call = self._calls.get(piece.index)
        if call is None:
            events += self._close()
            call_id = piece.id or f"call_{self._suffix}_{piece.index}"
            call = _FunctionCallItem(
                "fc_" + call_id.removeprefix("call_"), call_id, piece.name, len(self._items)
            )
            self._items.append(call)
            self._calls[piece.index] = call
            self._open = call
            events.append(
                self._event(
                    "response.output_item.added",
                    output_index=call.output_index,
                    item=call.item("in_progress"),
                )
            )
        if piece.arguments:
            call.arguments.append(piece.arguments)
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=call.item_id,
                    output_index=call.output_index,
                    delta=piece.arguments,
                )
            )
        return events

    def feed(self, chunk: TextChunk) -> list[bytes]:
        """The events ``chunk`` adds; the last chunk closes the open item and the response."""
        events: list[bytes] = []
        if chunk.delta:
            events += self._text(chunk)
        for piece in chunk.tool_calls:
            events += self._call_piece(piece)
        if chunk.usage is not None:
            self._usage = chunk.usage
        if chunk.finish_reason is not None:
            events += self._close()
            self._finish = chunk.finish_reason
            kind = "response.incomplete" if self._finish is FinishReason.LENGTH else "response.completed"
            events.append(self._event(kind, response=self.response()))
        return events

    def fail(self, error: LlmlbError) -> list[bytes]:
        """The events for an answer that failed midway: ``error``, then ``response.failed``."""
        self._error = error
        return [
            self._event("error", code=error.code.value, message=error.message, param=None),
            self._event("response.failed", response=self.response()),
        ]

    def whole(self, chunks: list[TextChunk]) -> dict[str, Any]:
        """The finished ``response`` object of a whole (non-streamed) answer."""
        for chunk in chunks:
            self.feed(chunk)
        if not self.finished:  # an empty answer: nothing was generated
            self.feed(TextChunk(self.response_id, "", FinishReason.STOP))
        return self.response()


def response_answer(answer: Answer[ChatRequest, TextChunk, ResponseCreateBody]) -> Response:
    """The HTTP answer to ``POST /v1/responses``: the ``response`` object, or its events as they come."""
    stream = answer.stream
    shown = stream.first if stream is not None else (answer.items[-1] if answer.items else None)
    builder = ResponseBuilder(
        "resp_" + answer.request_id, int(time.time()), answer.model, echoed(answer.keep)
    )
    if shown is not None:
        builder.model = shown.model or builder.model
        builder.created_at = shown.created or builder.created_at
    headers = answer_headers(answer, shown.node_id if shown else "")
    if stream is None:
        return json_response(builder.whole(answer.items), headers)

    def end() -> list[bytes]:  # an empty answer, or one whose last chunk said nothing: it ended
        return [] if builder.finished else builder.feed(TextChunk(builder.response_id, "", FinishReason.STOP))

    events = encoded(stream, builder.feed, builder.fail, start=builder.start(), end=end)
    return StreamingAnswer(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
