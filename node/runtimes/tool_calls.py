"""Tool calling for chat templates: offering tools to the model, and reading its calls back.

The generic format, for models whose chat template does not know tools (gemma 3's does not):

- the tools are described at the end of the system message (one is added when there is none): one
  JSON object ``{"name", "description", "parameters"}`` per line, then how to call them;
- a call is written ``<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>``; several calls
  follow each other one per line;
- an assistant message of the history that made calls is rendered as its text followed by its calls
  in that format, and a ``tool`` message as a user turn holding
  ``<tool_response>{"name": ..., "content": ...}</tool_response>`` (consecutive results share a turn).

When the template does know tools (it mentions ``tools``), the tools and the history's calls and results
are handed to it in OpenAI's shapes (arguments as objects, as Hugging Face templates expect) and it
renders them its own way. The model's answer is read in the format above either way: the node samples
it under a grammar (``node.runtimes.grammar``) that allows only well-formed calls whose arguments match
the function's schema, so the parsing here never has to guess.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Generator, Iterable
from dataclasses import dataclass, replace
from typing import Any

from common.inference import ChatMessage, ChatRequest, FinishReason, TextChunk, ToolCall, ToolChoiceMode

CALL_OPEN = "<tool_call>"
CALL_NAME_OPEN = '{"name": "'
CALL_ARGUMENTS = '", "arguments": '
CALL_CLOSE = "}</tool_call>"
CALL_SEPARATOR = "\n"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"


def new_call_id() -> str:
    """A fresh call id, in OpenAI's style."""
    return "call_" + secrets.token_hex(12)


def format_call(name: str, arguments: str) -> str:
    """One call in the generic format, the way the grammar makes the model write it."""
    return f"{CALL_OPEN}{CALL_NAME_OPEN}{name}{CALL_ARGUMENTS}{arguments.strip() or '{}'}{CALL_CLOSE}"


def template_knows_tools(template: str) -> bool:
    """Whether a chat template renders tools itself (it reads a ``tools`` variable)."""
    return "tools" in template


def offers_tools(request: ChatRequest) -> bool:
    return bool(request.tools) and request.tool_choice.mode is not ToolChoiceMode.NONE


def tools_prompt(request: ChatRequest) -> str:
    """The text that tells the model which tools it has and how to call them."""
    lines = ["You can call functions. The functions, one JSON object each:"]
    for tool in request.tools:
        spec = {"name": tool.name, "description": tool.description, "parameters": _arguments(tool.parameters)}
        lines.append(json.dumps(spec, ensure_ascii=False))
    lines.append(
        f'To call a function, answer with {CALL_OPEN}{{"name": "<function name>", "arguments": '
        f"<the arguments as a JSON object>}}</tool_call> and nothing else"
        + ("; write several calls one per line." if request.parallel_tool_calls else "; call one function.")
    )
    choice = request.tool_choice
    if choice.mode is ToolChoiceMode.FUNCTION:
        lines.append(f"Call the function {choice.function} now.")
    elif choice.mode is ToolChoiceMode.REQUIRED:
        lines.append("Call a function now.")
    else:
        lines.append("Answer in plain text when no function is needed.")
    return "\n".join(lines)


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return text  # the history's calls are the caller's text; shown as given


def template_messages(
    request: ChatRequest, knows_tools: bool
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """The messages (and tools, for a template that knows them) to render with the chat template."""
    names = {call.id: call.name for m in request.messages for call in m.tool_calls if call.id}
    if knows_tools:
        tools = (
            [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": _arguments(t.parameters),
                    },
                }
                for t in request.tools
            ]
            if offers_tools(request)
            else None
        )
        return [_openai_message(m, names) for m in request.messages], tools
    messages: list[dict[str, Any]] = []
    for m in request.messages:
        if m.role == "tool":
            result = json.dumps(
                {"name": names.get(m.tool_call_id, ""), "content": m.content}, ensure_ascii=False
            )
            text = f"{RESULT_OPEN}{result}{RESULT_CLOSE}"
            if messages and messages[-1].get("tool_results"):
                messages[-1]["content"] += "\n" + text
            else:
                messages.append({"role": "user", "content": text, "tool_results": True})
            continue
        content = m.content
        if m.tool_calls:
            calls = CALL_SEPARATOR.join(format_call(c.name, c.arguments) for c in m.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        messages.append({"role": m.role, "content": content, **({"name": m.name} if m.name else {})})
    for message in messages:
        message.pop("tool_results", None)
    if offers_tools(request):
        prompt = tools_prompt(request)
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{prompt}"
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages, None


def _openai_message(m: ChatMessage, names: dict[str, str]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        message["name"] = m.name
    if m.tool_calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.role == "tool":
        message["tool_call_id"] = m.tool_call_id
        message.setdefault("name", names.get(m.tool_call_id, ""))
    return message


# -- reading the answer ------------------------------------------------------------------------------


@dataclass
class _Call:
    index: int
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    started: bool = False  # the arguments' first character was seen


class CallReader:
    """Splits a streamed answer into text and tool-call pieces.

    An answer that begins with ``<tool_call>`` is calls (the grammar then allows nothing else);
    anything else is text, passed through as it comes. Call pieces follow OpenAI's streaming: the first
    piece of a call carries its id and name, the next ones the arguments as they are generated.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._mode = "start"  # start, text, head, arguments, tail
        self._call: _Call | None = None
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """The text and call pieces that ``text`` (the next piece of the answer) completes."""
        self._buffer += text
        out_text: list[str] = []
        pieces: list[ToolCall] = []
        while self._buffer:
            if self._mode == "text":
                out_text.append(self._buffer)
                self._buffer = ""
            elif self._mode == "start":
                if self.calls and self._buffer.startswith(CALL_SEPARATOR):
                    self._buffer = self._buffer[len(CALL_SEPARATOR) :]
                    continue
                if self._buffer.startswith(CALL_OPEN):
                    self._mode = "head"
                elif CALL_OPEN.startswith(self._buffer):
                    break  # could still become a call
                else:
                    self._mode = "text"
            elif self._mode == "head":
                if not self._head(pieces):
                    break
            elif self._mode == "arguments":
                self._arguments(pieces)
            elif not self._tail():
                break
        return "".join(out_text), pieces

    def flush(self) -> str:
        """What is left when the answer ends (text that only looked like the start of a call)."""
        left, self._buffer = self._buffer, ""
        return left if self._mode in ("start", "text") else ""

    def _head(self, pieces: list[ToolCall]) -> bool:
        opening = CALL_OPEN + CALL_NAME_OPEN
        if len(self._buffer) < len(opening):
            return False
        end = self._buffer.find(CALL_ARGUMENTS, len(opening))
        if end < 0:
            return False
        name = self._buffer[len(opening) : end]
        self._buffer = self._buffer[end + len(CALL_ARGUMENTS) :]
        self._call = _Call(index=self.calls)
        self.calls += 1
        pieces.append(ToolCall(index=self._call.index, id=new_call_id(), name=name))
        self._mode = "arguments"
        return True

    def _arguments(self, pieces: list[ToolCall]) -> None:
        call = self._call
        assert call is not None
        taken = 0
        done = False
        for ch in self._buffer:
            taken += 1
            if call.in_string:
                if call.escaped:
                    call.escaped = False
                elif ch == "\\":
                    call.escaped = True
                elif ch == '"':
                    call.in_string = False
                    done = call.depth == 0
            elif ch == '"':
                call.in_string, call.started = True, True
            elif ch in "{[":
                call.depth += 1
                call.started = True
            elif ch in "}]":
                call.depth -= 1
                done = call.depth == 0
            elif not ch.isspace():
                call.started = True
            if done:
                break
        piece, self._buffer = self._buffer[:taken], self._buffer[taken:]
        if piece:
            pieces.append(ToolCall(index=call.index, arguments=piece))
        if done:
            self._mode = "tail"

    def _tail(self) -> bool:
        """Consumes the end of a call; False while it has not all arrived."""
        stripped = self._buffer.lstrip(" \t\n")
        closing = CALL_CLOSE  # the call object's "}" then the closing tag
        if not stripped.startswith(closing):
            if len(stripped) >= len(closing) or not closing.startswith(stripped):
                self._mode = "text"  # not the format after all: keep what follows as text
                return True
            return False
        self._buffer = stripped[len(closing) :].lstrip(CALL_SEPARATOR)
        self._mode = "start"  # another call may follow
        return True


def read_calls(chunks: Iterable[TextChunk]) -> Generator[TextChunk, None, str]:
    """``chunks`` (a runtime's text chunks) with the answer split into text and tool-call pieces.

    A stream that made calls and ended normally ends with ``FinishReason.TOOL_CALLS``. Each chunk keeps
    its other fields (log-probabilities, usage), so counts stay per token. Each choice (``index``) is
    read apart. Returns the raw text of choice 0, as generated.
    """
    readers: dict[int, CallReader] = {}  # one per choice (n > 1 runs the choices in turn)
    raw: list[str] = []
    try:
        for chunk in chunks:
            if chunk.index == 0:
                raw.append(chunk.delta)
            reader = readers.setdefault(chunk.index, CallReader())
            text, pieces = reader.feed(chunk.delta)
            if chunk.finish_reason is not None:
                text += reader.flush()
                finish = chunk.finish_reason
                if reader.calls and finish is FinishReason.STOP:
                    finish = FinishReason.TOOL_CALLS
                yield replace(chunk, delta=text, tool_calls=tuple(pieces), finish_reason=finish)
            elif text or pieces or chunk.usage is not None:
                yield replace(chunk, delta=text, tool_calls=tuple(pieces))
            elif chunk.logprobs:
                yield replace(chunk, delta="")  # the tokens still count, though held back for now
    finally:
        # Closed now, not when collected: the generation must let go of its context before the
        # runtime hands the context to the next request.
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return "".join(raw)
