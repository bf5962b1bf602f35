"""A Responses API body -> the internal ``ChatRequest``; pure functions.

The Responses API is chat under another shape: ``instructions`` becomes a leading system message, the
``input`` items become the history (``function_call`` items become an assistant message's tool calls,
``function_call_output`` items become ``tool`` messages), ``text.format`` becomes the response format
and function tools become ``Tool``s. The balancer keeps no state, so anything that needs a stored
response (``previous_response_id``, ``store: true``, ``conversation``, ``background``) is refused, as is
every other feature it does not offer: a 400 naming it, never a silent drop.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from balancer.edge.plane import Asked
from balancer.http.openai_requests import invalid, parse_body, request_id
from balancer.http.responses_schemas import (
    InputContentPart,
    InputItem,
    NamedToolChoice,
    ResponseCreateBody,
    TextFormat,
)
from balancer.http.tool_requests import RESPONSES_TOOLS, FunctionSpec, tooling
from common.inference import (
    ChatMessage,
    ChatRequest,
    ResponseFormat,
    ResponseFormatType,
    SamplingParams,
    Tool,
    ToolCall,
    ToolChoice,
)

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _refuse_unsupported(body: ResponseCreateBody) -> None:
    if body.previous_response_id is not None:
        raise invalid(
            "previous_response_id is not supported: responses are not stored; send the whole conversation "
            "in input"
        )
    if body.store:
        raise invalid("store: true is not supported: responses are not stored; send store: false or omit it")
    if body.conversation is not None:
        raise invalid("conversation is not supported: conversations are not stored")
    if body.background:
        raise invalid("background: true is not supported; use stream: true for long answers")
    if body.reasoning is not None:
        raise invalid("reasoning is not supported: the served models do not reason")
    if body.prompt is not None:
        raise invalid("prompt (stored prompt templates) is not supported; send instructions and input")
    if body.max_tool_calls is not None:
        raise invalid("max_tool_calls is not supported; use parallel_tool_calls: false for one call")
    if body.truncation not in (None, "disabled"):
        raise invalid(f"truncation {body.truncation!r} is not supported; only 'disabled'")
    for item in body.include or ():
        if item != LOGPROBS_INCLUDE:
            raise invalid(f"include {item!r} is not supported; only {LOGPROBS_INCLUDE!r}")


def _part_text(where: str, parts: str | list[InputContentPart] | None) -> str:
    if parts is None or isinstance(parts, str):
        return parts or ""
    texts = []
    for i, part in enumerate(parts):
        if part.type not in TEXT_PARTS or part.text is None:
            raise invalid(f"{where}.{i}: only text content parts are supported, got {part.type!r}")
        texts.append(part.text)
    return "\n".join(texts)


def _messages(body: ResponseCreateBody) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    if body.instructions:
        messages.append(ChatMessage(role="system", content=body.instructions))
    if isinstance(body.input, str):
        messages.append(ChatMessage(role="user", content=body.input))
        return messages
    for i, item in enumerate(body.input):
        message = _item_message(f"input.{i}", item)
        previous = messages[-1] if messages else None
        if message.tool_calls and previous is not None and previous.role == "assistant":
            # Calls made in one turn are one assistant message with several tool calls, as chat has them.
            calls = previous.tool_calls
            call = message.tool_calls[0]
            joined = ToolCall(len(calls), call.id, call.name, call.arguments)
            messages[-1] = ChatMessage("assistant", previous.content, tool_calls=(*calls, joined))
        else:
            messages.append(message)
    return messages


def _item_message(where: str, item: InputItem) -> ChatMessage:
    kind = item.type or ("message" if item.role is not None else None)
    if kind == "message":
        role = ROLES.get(item.role or "")
        if role is None:
            raise invalid(f"{where}.role: must be one of {sorted(ROLES)}, got {item.role!r}")
        return ChatMessage(role=role, content=_part_text(f"{where}.content", item.content))
    if kind == "function_call":
        if not item.call_id or not item.name:
            raise invalid(f"{where}: a function_call item needs call_id and name")
        call = ToolCall(id=item.call_id, name=item.name, arguments=item.arguments or "{}")
        return ChatMessage(role="assistant", content="", tool_calls=(call,))
    if kind == "function_call_output":
        if not item.call_id:
            raise invalid(f"{where}: a function_call_output item needs call_id")
        content = _part_text(f"{where}.output", item.output)
        return ChatMessage(role="tool", content=content, tool_call_id=item.call_id)
    raise invalid(
        f"{where}: input items of type {kind!r} are not supported; use messages, function_call and "
        "function_call_output items"
    )


def _response_format(text_format: TextFormat | None) -> ResponseFormat:
    if text_format is None or text_format.type == "text":
        return ResponseFormat()
    if text_format.type == "json_object":
        return ResponseFormat(type=ResponseFormatType.JSON_OBJECT)
    if text_format.type == "json_schema":
        if text_format.schema_ is None:
            raise invalid("text.format.schema is required for type 'json_schema'")
        if not text_format.name:
            raise invalid("text.format.name is required for type 'json_schema'")
        return ResponseFormat(
            type=ResponseFormatType.JSON_SCHEMA,
            schema=json.dumps(text_format.schema_),
            name=text_format.name,
            strict=bool(text_format.strict),
        )
    raise invalid(
        f"text.format.type {text_format.type!r} is not supported; use 'text', 'json_object' or 'json_schema'"
    )


def _tooling(body: ResponseCreateBody) -> tuple[tuple[Tool, ...], ToolChoice]:
    flat = (FunctionSpec(t.type, t.name, t.description, t.parameters, t.strict) for t in body.tools or ())
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return tooling(flat, FunctionSpec(choice.type, choice.name), RESPONSES_TOOLS)
    return tooling(flat, choice, RESPONSES_TOOLS)


def logprobs_asked(body: ResponseCreateBody) -> bool:
    return LOGPROBS_INCLUDE in (body.include or ())


def response_request(body: ResponseCreateBody, request_id: str) -> ChatRequest:
    """A ``POST /v1/responses`` body as a ``ChatRequest`` (one choice; the balancer keeps no state)."""
    _refuse_unsupported(body)
    tools, tool_choice = _tooling(body)
    return ChatRequest(
        model=body.model,
        messages=tuple(_messages(body)),
        params=SamplingParams(
            max_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            response_format=_response_format(body.text.format if body.text else None),
            logprobs=logprobs_asked(body),
            top_logprobs=body.top_logprobs or 0,
        ),
        request_id=request_id,
        user=body.user or "",
        prompt_cache_key=body.prompt_cache_key or "",
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )


def echoed(body: ResponseCreateBody) -> dict[str, Any]:
    """The request's settings as a ``response`` object repeats them."""
    text_format: dict[str, Any] = {"type": "text"}
    if body.text and body.text.format:
        text_format = body.text.format.model_dump(by_alias=True, exclude_none=True)
    tool_choice: Any = body.tool_choice or "auto"
    if isinstance(tool_choice, NamedToolChoice):
        tool_choice = tool_choice.model_dump(exclude_none=True)
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "tool_choice": tool_choice,
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()],
        "text": {"format": text_format},
        "metadata": dict(body.metadata or {}),
        "user": body.user,
        "top_logprobs": body.top_logprobs,
        "truncation": "disabled",
        "previous_response_id": None,
        "store": False,
        "background": False,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
    }


async def response(request: Request) -> Asked[ChatRequest, ResponseCreateBody]:
    """``POST /v1/responses``; kept: the body, which the answer echoes."""
    body = parse_body(ResponseCreateBody, await request.body())
    return Asked(response_request(body, request_id(request)), bool(body.stream), body)
