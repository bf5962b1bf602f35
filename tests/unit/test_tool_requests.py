"""Tools and tool choice through Chat Completions and the Responses API: one meaning, one set of refusals.

Each mistake is sent in each API's own shape (Chat nests a function under ``function``, Responses keeps
it flat); both answer the same 400, naming the field as that API spells it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from balancer.http.openai_requests import chat_request, parse_body
from balancer.http.responses_requests import response_request
from balancer.http.responses_schemas import ResponseCreateBody
from balancer.http.schemas import ChatCompletionBody
from common.errors import ErrorCode, LlmlbError
from common.inference import ChatRequest, Tool, ToolChoice, ToolChoiceMode

CHAT_NAMED = "{'type': 'function', 'function': {'name': ...}}"
RESPONSES_NAMED = "{'type': 'function', 'name': ...}"


def as_chat(**fields: Any) -> ChatRequest:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return chat_request(parse_body(ChatCompletionBody, json.dumps(payload).encode()), "r")


def as_response(**fields: Any) -> ChatRequest:
    payload = {"model": "m", "input": "hi", **fields}
    return response_request(parse_body(ResponseCreateBody, json.dumps(payload).encode()), "r")


def refusal(send: Any, fields: dict[str, Any]) -> str:
    with pytest.raises(LlmlbError) as caught:
        send(**fields)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    return caught.value.message


@pytest.mark.parametrize(
    ("chat", "responses", "chat_message", "responses_message"),
    [
        pytest.param(
            {"tools": [{"type": "custom", "function": {"name": "f"}}]},
            {"tools": [{"type": "custom", "name": "f"}]},
            "tools.0.type 'custom' is not supported; use 'function'",
            "tools.0.type 'custom' is not supported; use 'function'",
            id="a tool of another type",
        ),
        pytest.param(
            {
                "tools": [
                    {"type": "function", "function": {"name": "f"}},
                    {"type": "function", "function": {"name": ""}},
                ]
            },
            {"tools": [{"type": "function", "name": "f"}, {"type": "function", "name": ""}]},
            "missing required parameter: 'tools.1.function.name'",
            "missing required parameter: 'tools.1.name'",
            id="a tool with an empty name",
        ),
        pytest.param(
            {"tool_choice": "sometimes"},
            {"tool_choice": "sometimes"},
            "tool_choice 'sometimes' is not supported; use 'auto', 'none', 'required' or a function",
            "tool_choice 'sometimes' is not supported; use 'auto', 'none', 'required' or a function",
            id="an unknown mode",
        ),
        pytest.param(
            {"tool_choice": "function"},
            {"tool_choice": "function"},
            f"tool_choice 'function' needs a name: {CHAT_NAMED}",
            f"tool_choice 'function' needs a name: {RESPONSES_NAMED}",
            id="'function' as a mode",
        ),
        pytest.param(
            {"tool_choice": {"type": "web_search"}},
            {"tool_choice": {"type": "web_search"}},
            f"tool_choice.type 'web_search' is not supported; name a function: {CHAT_NAMED}",
            f"tool_choice.type 'web_search' is not supported; name a function: {RESPONSES_NAMED}",
            id="a choice of another type",
        ),
        pytest.param(
            {"tool_choice": {"type": "function"}},
            {"tool_choice": {"type": "function"}},
            "missing required parameter: 'tool_choice.function.name'",
            "missing required parameter: 'tool_choice.name'",
            id="a choice without a name",
        ),
    ],
)
def test_chat_and_responses_refuse_the_same_tool_mistakes_with_the_same_message(
    chat: dict[str, Any], responses: dict[str, Any], chat_message: str, responses_message: str
) -> None:
    assert refusal(as_chat, chat) == chat_message
    assert refusal(as_response, responses) == responses_message


def test_a_tool_missing_its_name_is_refused_alike_by_the_body_and_by_the_mapping() -> None:
    chat = refusal(as_chat, {"tools": [{"type": "function", "function": {"parameters": {}}}]})
    responses = refusal(as_response, {"tools": [{"type": "function", "parameters": {}}]})
    assert (chat, responses) == (
        "missing required parameter: 'tools.0.function.name'",
        "missing required parameter: 'tools.0.name'",
    )


def test_the_same_tools_in_either_shape_make_the_same_request() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    function = {"name": "weather", "description": "Today's weather.", "parameters": schema, "strict": True}
    chat = as_chat(
        tools=[
            {"type": "function", "function": function},
            {"type": "function", "function": {"name": "time"}},
        ],
        tool_choice={"type": "function", "function": {"name": "weather"}},
    )
    responses = as_response(
        tools=[{"type": "function", **function}, {"type": "function", "name": "time"}],
        tool_choice={"type": "function", "name": "weather"},
    )
    expected = (Tool("weather", "Today's weather.", json.dumps(schema), True), Tool("time"))
    assert chat.tools == responses.tools == expected
    assert chat.tool_choice == responses.tool_choice == ToolChoice(ToolChoiceMode.FUNCTION, "weather")
    for mode in ("auto", "none", "required"):
        assert as_chat(tool_choice=mode).tool_choice == as_response(tool_choice=mode).tool_choice
        assert as_chat(tool_choice=mode).tool_choice == ToolChoice(ToolChoiceMode(mode))
