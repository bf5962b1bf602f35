"""Which schemas and tool lists every door admits, and what the refusal says."""

from __future__ import annotations

import json
from typing import Any

import pytest

from common.errors import ErrorCode, LlmlbError
from common.inference import (
    ChatMessage,
    ChatRequest,
    ResponseFormat,
    ResponseFormatType,
    SamplingParams,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
)

ASK = (ChatMessage("user", "hi"),)
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}


def with_schema(schema: Any) -> ChatRequest:
    fmt = ResponseFormat(ResponseFormatType.JSON_SCHEMA, json.dumps(schema))
    return ChatRequest("m", ASK, SamplingParams(response_format=fmt))


def refusal(request: ChatRequest) -> str:
    with pytest.raises(LlmlbError) as refused:
        request.validate()
    assert refused.value.code is ErrorCode.INVALID_REQUEST
    return refused.value.message


@pytest.mark.parametrize(
    "schema",
    [
        WEATHER,
        {
            "type": "object",
            "properties": {"tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        },
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}], "title": "Maybe", "default": None},
        {"$defs": {"P": {"type": "object", "properties": {"x": {"type": "number"}}}}, "$ref": "#/$defs/P"},
        {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}}},
        {"type": ["string", "null"]},
        {"type": "string", "enum": ["a", "b"]},
        {},
    ],
)
def test_schemas_a_grammar_enforces_exactly_are_admitted(schema: Any) -> None:
    with_schema(schema).validate()


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "object", "patternProperties": {"^x": {}}}, "'patternProperties' is not supported"),
        ({"type": "integer", "minimum": 0}, "'minimum' is not supported"),
        ({"type": "string", "pattern": "^a+$"}, "'pattern' is not supported"),
        ({"type": "string", "format": "email"}, "format 'email' is not supported"),
        ({"type": "array", "items": {}, "uniqueItems": True}, "'uniqueItems' is not supported"),
        ({"allOf": [{"type": "string"}]}, "'allOf' without a 'type' is not supported"),
        ({"not": {"type": "string"}}, "'not' without a 'type' is not supported"),
        ({"$ref": "https://example.com/s.json"}, "only local references"),
        ({"$ref": "#/$defs/Missing"}, "points to nothing"),
        ({"type": "object", "properties": {}, "required": ["x"]}, "'required' names 'x'"),
        ({"type": ["string", "null"], "maxLength": 3}, "use 'anyOf'"),
        ({"type": "string", "const": 3}, "is not of the schema's type"),
        ({"type": "object", "properties": {"a": {"type": "string", "minLength": "2"}}}, "(at properties.a)"),
        ({"type": {"weird": 1}}, "unknown type {'weird': 1}"),
        ({"type": [["string"]]}, "unknown type ['string']"),
        ({"type": {"a": 1}, "enum": [1]}, "is not of the schema's type"),
        ({"type": "string", "format": ["date"]}, "format ['date'] is not supported"),
    ],
)
def test_what_a_grammar_cannot_enforce_is_refused_by_name(schema: Any, says: str) -> None:
    message = refusal(with_schema(schema))
    assert message.startswith("response_format.json_schema: ")
    assert says in message


def test_a_schema_that_is_not_json_or_missing_is_refused() -> None:
    broken = ChatRequest(
        "m", ASK, SamplingParams(response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, "{"))
    )
    assert "not valid JSON" in refusal(broken)
    missing = ChatRequest(
        "m", ASK, SamplingParams(response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA))
    )
    assert "the schema is missing" in refusal(missing)
    deep = ResponseFormat(ResponseFormatType.JSON_SCHEMA, "[" * 20_000 + "]" * 20_000)
    assert "not valid JSON" in refusal(ChatRequest("m", ASK, SamplingParams(response_format=deep)))


def tools_request(*tools: Tool, choice: ToolChoice | None = None, messages: Any = ASK) -> ChatRequest:
    return ChatRequest("m", tuple(messages), tools=tools, tool_choice=choice or ToolChoice())


def test_tools_are_checked_for_names_duplicates_choices_and_schemas() -> None:
    weather = Tool("get_weather", parameters=json.dumps(WEATHER))
    tools_request(weather, Tool("get_time")).validate()
    tools_request(weather, choice=ToolChoice(ToolChoiceMode.FUNCTION, "get_weather")).validate()

    assert "tools.0.function.name 'get weather'" in refusal(tools_request(Tool("get weather")))
    assert "given twice" in refusal(tools_request(weather, weather))
    unknown = tools_request(weather, choice=ToolChoice(ToolChoiceMode.FUNCTION, "get_time"))
    assert "'get_time', which is not in tools" in refusal(unknown)
    assert "'required' needs at least one tool" in refusal(
        tools_request(choice=ToolChoice(ToolChoiceMode.REQUIRED))
    )
    not_object = tools_request(Tool("f", parameters='{"type": "string"}'))
    assert "tools.0.function.parameters must be a JSON Schema of type 'object'" in refusal(not_object)
    unenforceable = tools_request(Tool("f", parameters='{"type": "object", "minProperties": 1}'))
    assert "tools.0.function.parameters: 'minProperties' is not supported" in refusal(unenforceable)


def test_tool_messages_need_the_call_they_answer() -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments="{}")
    history = [
        *ASK,
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "21C", tool_call_id="call_1"),
    ]
    tools_request(messages=history).validate()
    orphan = [*ASK, ChatMessage("tool", "21C")]
    assert "needs tool_call_id" in refusal(tools_request(messages=orphan))
    wrong = [ChatMessage("user", "hi", tool_calls=(call,))]
    assert "only 'assistant' messages carry tool_calls" in refusal(tools_request(messages=wrong))
