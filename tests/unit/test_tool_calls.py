"""The generic tool-call format: how tools and history are shown to a model, and how calls are read back."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from common.inference import (
    ChatMessage,
    ChatRequest,
    FinishReason,
    ResponseFormat,
    ResponseFormatType,
    SamplingParams,
    TextChunk,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
)
from node.runtimes.grammar import response_grammar, tool_grammar
from node.runtimes.tool_calls import (
    CallReader,
    format_call,
    read_calls,
    template_knows_tools,
    template_messages,
)

WEATHER = Tool(
    "get_weather", "The weather in a city", '{"type": "object", "properties": {"city": {"type": "string"}}}'
)
CLOCK = Tool("get_time", "The time now")
GEMMA_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def conversation() -> tuple[ChatMessage, ...]:
    calls = (
        ToolCall(0, "call_a", "get_weather", '{"city": "Oslo"}'),
        ToolCall(1, "call_b", "get_time", "{}"),
    )
    return (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather and time in Oslo?"),
        ChatMessage("assistant", "", tool_calls=calls),
        ChatMessage("tool", "rain", tool_call_id="call_a"),
        ChatMessage("tool", "10:00", tool_call_id="call_b"),
    )


def test_the_generic_format_puts_tools_in_the_system_message_and_history_in_text() -> None:
    request = ChatRequest("m", conversation(), tools=(WEATHER, CLOCK))
    assert not template_knows_tools(GEMMA_TEMPLATE)
    messages, tools = template_messages(request, knows_tools=False)
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\nYou can call functions.")
    assert (
        json.dumps(
            {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": json.loads(WEATHER.parameters),
            }
        )
        in system
    )
    assert messages[2]["content"] == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    # Both results in one user turn, each naming the function it answers.
    assert messages[3]["content"] == (
        '<tool_response>{"name": "get_weather", "content": "rain"}</tool_response>\n'
        '<tool_response>{"name": "get_time", "content": "10:00"}</tool_response>'
    )


def test_choice_none_offers_no_tools_and_a_template_that_knows_tools_gets_them_whole() -> None:
    silent = ChatRequest("m", conversation(), tools=(WEATHER,), tool_choice=ToolChoice(ToolChoiceMode.NONE))
    messages, _ = template_messages(silent, knows_tools=False)
    assert "You can call functions" not in messages[0]["content"]

    request = ChatRequest("m", conversation(), tools=(WEATHER,))
    messages, tools = template_messages(request, knows_tools=True)
    assert tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": json.loads(WEATHER.parameters),
            },
        }
    ]
    assert messages[2]["tool_calls"][0] == {
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
    }
    assert messages[3] == {"role": "tool", "content": "rain", "tool_call_id": "call_a", "name": "get_weather"}


def read(pieces: list[str]) -> tuple[str, list[ToolCall]]:
    reader = CallReader()
    text, calls = [], []
    for piece in pieces:
        t, c = reader.feed(piece)
        text.append(t)
        calls.extend(c)
    text.append(reader.flush())
    return "".join(text), calls


def whole(calls: list[ToolCall]) -> list[tuple[str, str]]:
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for piece in calls:
        if piece.name:
            names[piece.index] = piece.name
        arguments[piece.index] = arguments.get(piece.index, "") + piece.arguments
    return [(names[i], arguments[i]) for i in sorted(names)]


ANSWER = (
    format_call("get_weather", '{"city": "Oslo \\"}</tool_call>", "days": [1, 2]}')
    + "\n"
    + format_call("get_time", "{}")
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_calls_are_read_the_same_however_the_text_is_split(size: int) -> None:
    text, calls = read([ANSWER[i : i + size] for i in range(0, len(ANSWER), size)])
    assert text.strip() == ""
    assert whole(calls) == [
        ("get_weather", '{"city": "Oslo \\"}</tool_call>", "days": [1, 2]}'),
        ("get_time", "{}"),
    ]
    firsts = [c for c in calls if c.name]
    assert [c.index for c in firsts] == [0, 1] and all(
        re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in firsts
    )
    assert all(not c.id for c in calls if not c.name)


def test_text_that_is_not_a_call_passes_through_even_when_it_starts_like_one() -> None:
    assert read(["Hello", " there"]) == ("Hello there", [])
    assert read(["<tool", "box> is a tag"]) == ("<toolbox> is a tag", [])
    assert read(["<to"]) == ("<to", [])  # the answer ended before it could be a call


def test_a_stream_of_calls_ends_with_finish_reason_tool_calls() -> None:
    raw = [TextChunk("", ANSWER[:20]), TextChunk("", ANSWER[20:]), TextChunk("", "", FinishReason.STOP)]
    chunks = list(read_calls(iter(raw)))
    assert chunks[-1].finish_reason is FinishReason.TOOL_CALLS
    assert "".join(c.delta for c in chunks).strip() == ""
    plain = list(read_calls(iter([TextChunk("", "Hi"), TextChunk("", "", FinishReason.STOP)])))
    assert [(c.delta, c.finish_reason) for c in plain] == [("Hi", None), ("", FinishReason.STOP)]


def test_grammars_keep_each_tools_rules_apart_and_follow_the_choice() -> None:
    # Two tools whose schemas both define $defs/Item, differently: each call keeps its own.
    item = '{"type": "object", "properties": {"x": {"$ref": "#/$defs/Item"}}, "$defs": {"Item": %s}}'
    a = Tool("a", parameters=item % '{"type": "integer"}')
    b = Tool("b", parameters=item % '{"type": "boolean"}')
    grammar = tool_grammar(
        ChatRequest(
            "m", (ChatMessage("user", "hi"),), tools=(a, b), tool_choice=ToolChoice(ToolChoiceMode.REQUIRED)
        )
    )
    assert grammar is not None
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    assert rules["root"] == "calls" and rules["calls"] == 'call ("\\n" call)*'
    assert (rules["tool0-x"], rules["tool1-x"]) == ("tool0-integer", "tool1-boolean")
    assert rules["call0"] == '"<tool_call>{\\"name\\": \\"a\\", \\"arguments\\": " tool0-root "}</tool_call>"'
    named = tool_grammar(
        ChatRequest(
            "m",
            (ChatMessage("user", "hi"),),
            tools=(a, b),
            tool_choice=ToolChoice(ToolChoiceMode.FUNCTION, "b"),
        )
    )
    assert named is not None and "root ::= calls\n" in named and "call ::= call1\n" in named
    auto = tool_grammar(ChatRequest("m", (ChatMessage("user", "hi"),), tools=(a,)))
    assert auto is not None and auto.startswith("root ::= calls | text")
    free = ChatRequest(
        "m", (ChatMessage("user", "hi"),), tools=(a,), tool_choice=ToolChoice(ToolChoiceMode.NONE)
    )
    assert tool_grammar(free) is None
    assert response_grammar(ResponseFormat()) is None
    assert response_grammar(ResponseFormat(ResponseFormatType.JSON_OBJECT)) is not None
    fmt = ResponseFormat(
        ResponseFormatType.JSON_SCHEMA, '{"type": "object", "properties": {"ok": {"type": "boolean"}}}'
    )
    with_format = ChatRequest("m", (ChatMessage("user", "hi"),), SamplingParams(response_format=fmt))
    assert tool_grammar(with_format) == response_grammar(fmt)


def test_closing_the_reader_closes_the_generation_at_once() -> None:
    closed: list[bool] = []

    def generation() -> Iterator[TextChunk]:
        try:
            yield TextChunk("", "Hi")
            yield TextChunk("", " there")
        finally:
            closed.append(True)

    running = generation()  # held here too, as the runtime holds it
    reader = read_calls(running)
    assert next(reader).delta == "Hi"
    reader.close()  # the caller went away
    assert closed == [True]
