"""The Responses API's mapping: bodies -> ChatRequest, and answer chunks -> the response and its events."""

from __future__ import annotations

import json
from typing import Any

import openai.types.responses as sdk
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from pydantic import TypeAdapter

from balancer.http.openai_requests import parse_body
from balancer.http.responses_answers import ResponseBuilder
from balancer.http.responses_requests import echoed, response_request
from balancer.http.responses_schemas import ResponseCreateBody
from common.errors import ErrorCode, LlmlbError
from common.inference import (
    ChatMessage,
    FinishReason,
    ResponseFormatType,
    TextChunk,
    TokenLogprob,
    ToolCall,
    ToolChoiceMode,
    Usage,
)
from tests.unit import test_http_app
from tests.unit.test_http_app import Shim, error_of


def body(**fields: Any) -> ResponseCreateBody:
    return parse_body(ResponseCreateBody, json.dumps({"model": "m", "input": "hi", **fields}).encode())


def refusal(**fields: Any) -> str:
    """The 400's message, from the mapping or from admission's checks after it (as the route runs them)."""
    with pytest.raises(LlmlbError) as caught:
        response_request(body(**fields), "r").validate()
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    return caught.value.message


def test_string_input_with_instructions_is_a_system_then_user_message() -> None:
    request = response_request(body(instructions="Be brief.", max_output_tokens=7, temperature=0.0), "r")
    assert request.messages == (ChatMessage("system", "Be brief."), ChatMessage("user", "hi"))
    assert request.params.max_tokens == 7
    assert request.params.temperature == 0.0


def test_message_items_with_parts_and_function_calls_become_chat_history() -> None:
    items = [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "function_call", "call_id": "call_a", "name": "get", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "3C"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It is 3C."}]},
    ]
    messages = response_request(body(input=items), "r").messages
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[1].content == "weather?"
    assert messages[2].tool_calls == (
        ToolCall(0, "call_a", "get", '{"city":"Oslo"}'),
        ToolCall(1, "call_b", "get", '{"city":"Rome"}'),
    )
    assert (messages[3].content, messages[3].tool_call_id) == ("3C", "call_a")
    assert messages[4].content == "It is 3C."


def test_text_format_and_function_tools_map_to_response_format_and_tools() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    tool = {"type": "function", "name": "f", "description": "d", "parameters": schema, "strict": True}
    request = response_request(
        body(
            text={"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}},
            tools=[tool],
            tool_choice={"type": "function", "name": "f"},
            parallel_tool_calls=False,
        ),
        "r",
    )
    fmt = request.params.response_format
    assert (fmt.type, json.loads(fmt.schema), fmt.name, fmt.strict) == (
        ResponseFormatType.JSON_SCHEMA,
        schema,
        "A",
        True,
    )
    assert request.tools[0].name == "f" and json.loads(request.tools[0].parameters) == schema
    assert (request.tool_choice.mode, request.tool_choice.function) == (ToolChoiceMode.FUNCTION, "f")
    assert request.parallel_tool_calls is False
    assert response_request(body(tools=[tool], tool_choice="required"), "r").tool_choice.mode is (
        ToolChoiceMode.REQUIRED
    )
    assert response_request(
        body(text={"format": {"type": "json_object"}}), "r"
    ).params.response_format.type is (ResponseFormatType.JSON_OBJECT)
    asked = response_request(body(include=["message.output_text.logprobs"], top_logprobs=2), "r").params
    assert (asked.logprobs, asked.top_logprobs) == (True, 2)


def test_store_false_or_unset_is_served_statelessly() -> None:
    response_request(body(store=False), "r")
    assert echoed(body())["store"] is False


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "web_search"}]}, "'web_search'"),
        ({"input": [{"type": "reasoning", "id": "rs_1"}]}, "'reasoning'"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "'input_image'",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "A"}}}, "text.format.schema"),
        (
            {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
            "'g'",
        ),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"include": ["file_search_call.results"]}, "file_search_call.results"),
        ({"background": True}, "background"),
    ],
)
def test_unsupported_features_are_refused_by_name(fields: dict[str, Any], names: str) -> None:
    assert names in refusal(**fields)


def events(raw: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for piece in raw:
        kind, data = piece.decode().split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert kind == "event: " + event["type"]
        out.append(event)
    return out


def builder() -> ResponseBuilder:
    return ResponseBuilder("resp_1", 100, "m", echoed(body()))


def test_streamed_text_is_announced_filled_and_completed_in_sequence() -> None:
    b = builder()
    raw = b.start()
    raw += b.feed(TextChunk("1", "Hel", logprobs=(TokenLogprob("Hel", -0.5),)))
    raw += b.feed(TextChunk("1", "lo", FinishReason.STOP, Usage(3, 2, 1)))
    seen = events(raw)
    assert [e["type"] for e in seen] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in seen] == list(range(len(seen)))
    assert seen[0]["response"]["status"] == "in_progress"
    assert seen[4]["logprobs"][0]["logprob"] == -0.5
    done = seen[-1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0]["text"] == "Hello"
    assert done["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 1, "cache_write_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 5,
    }


def test_tool_call_pieces_become_function_call_items() -> None:
    b = builder()
    raw = b.feed(TextChunk("1", "", tool_calls=(ToolCall(0, "call_x", "get", '{"ci'),)))
    raw += b.feed(TextChunk("1", "", tool_calls=(ToolCall(0, arguments='ty":"Oslo"}'),)))
    raw += b.feed(TextChunk("1", "", tool_calls=(ToolCall(1, "call_y", "put", "{}"),)))
    raw += b.feed(TextChunk("1", "", FinishReason.TOOL_CALLS, Usage(1, 1)))
    seen = events(raw)
    assert [e["type"] for e in seen] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert seen[3]["arguments"] == '{"city":"Oslo"}'
    output = seen[-1]["response"]["output"]
    assert [(o["type"], o["call_id"], o["name"], o["arguments"]) for o in output] == [
        ("function_call", "call_x", "get", '{"city":"Oslo"}'),
        ("function_call", "call_y", "put", "{}"),
    ]


def test_a_whole_answer_cut_by_max_output_tokens_is_incomplete() -> None:
    response = builder().whole([TextChunk("1", "abc"), TextChunk("1", "d", FinishReason.LENGTH, Usage(2, 2))])
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["content"][0]["text"] == "abcd"
    assert response["id"] == "resp_1" and response["object"] == "response"


def test_a_failure_midway_is_an_error_event_then_response_failed() -> None:
    b = builder()
    b.feed(TextChunk("1", "par"))
    seen = events(b.fail(LlmlbError(ErrorCode.TIMEOUT, "too slow")))
    assert [e["type"] for e in seen] == ["error", "response.failed"]
    assert seen[0]["code"] == "timeout" and seen[0]["message"] == "too slow"
    assert seen[1]["response"]["status"] == "failed"
    assert seen[1]["response"]["error"] == {"code": "server_error", "message": "too slow"}


def test_every_event_and_the_response_validate_against_the_official_client_types() -> None:
    parse = TypeAdapter(sdk.ResponseStreamEvent).validate_python
    b = builder()
    raw = b.start() + b.feed(TextChunk("1", "Hi", logprobs=(TokenLogprob("Hi", -0.5, b"Hi"),)))
    raw += b.feed(TextChunk("1", "", tool_calls=(ToolCall(0, "call_x", "get", "{}"),)))
    raw += b.feed(TextChunk("1", "", FinishReason.TOOL_CALLS, Usage(1, 1)))
    failing = builder()
    failing.feed(TextChunk("1", "x"))
    raw += failing.fail(LlmlbError(ErrorCode.TIMEOUT, "slow"))
    for event in events(raw):
        assert parse(event).type == event["type"]
    whole = builder().whole([TextChunk("1", "ab", FinishReason.LENGTH)])
    assert sdk.Response.model_validate(whole).output_text == "ab"


def test_the_clients_stream_helper_accumulates_the_events_into_its_final_response() -> None:
    parse = TypeAdapter(sdk.ResponseStreamEvent).validate_python
    b = builder()
    raw = b.start() + b.feed(TextChunk("1", "Hel")) + b.feed(TextChunk("1", "lo"))
    raw += b.feed(TextChunk("1", "", tool_calls=(ToolCall(0, "call_x", "get", '{"a":'),)))
    raw += b.feed(TextChunk("1", "", tool_calls=(ToolCall(0, arguments="1}"),)))
    raw += b.feed(TextChunk("1", "", FinishReason.TOOL_CALLS, Usage(4, 3)))
    state: ResponseStreamState[object] = ResponseStreamState(input_tools=[], text_format=omit)
    for event in events(raw):
        state.handle_event(parse(event))
    final = state._completed_response
    assert final is not None and final.output_text == "Hello"
    call = final.output[1]
    assert call.type == "function_call" and (call.name, call.arguments) == ("get", '{"a":1}')


def test_text_after_a_tool_call_is_a_second_message_item() -> None:
    response = builder().whole(
        [
            TextChunk("1", "Let me look."),
            TextChunk("1", "", tool_calls=(ToolCall(0, "call_x", "get", "{}"),)),
            TextChunk("1", "Done.", FinishReason.STOP),
        ]
    )
    output = response["output"]
    assert [o["type"] for o in output] == ["message", "function_call", "message"]
    assert [o["content"][0]["text"] for o in (output[0], output[2])] == ["Let me look.", "Done."]
    assert output[0]["id"] != output[2]["id"]
    assert all(o["status"] == "completed" for o in output)


# -- the route, in process (no node) -----------------------------------------------------------------

shim = test_http_app.shim  # the in-process shim on a balancer's real parts


async def test_the_route_refuses_like_chat_does_in_openai_shape_and_counts_under_responses(
    shim: Shim,
) -> None:
    url = "/v1/responses"
    ask = {"model": "gemma-3-270m", "input": "Hi"}
    assert "key" in error_of(await shim.client.post(url, json=ask), 401, "unauthorized")
    unknown = await shim.client.post(url, headers=shim.api, json={**ask, "model": "nope", "stream": True})
    error_of(unknown, 404, "model_not_found")  # a plain JSON error, not an event stream
    bad = await shim.client.post(url, headers=shim.api, json={**ask, "previous_response_id": "resp_1"})
    assert "previous_response_id" in error_of(bad, 400, "invalid_request")
    error_of(
        await shim.client.post(url, headers=shim.api, json={"model": "gemma-3-270m"}), 400, "invalid_request"
    )
    no_node = await shim.client.post(url, headers=shim.api, json=ask)
    error_of(no_node, 503, "no_capable_nodes")
    scrape = (await shim.client.get("/metrics")).text
    assert (
        'llmlb_requests_total{code="no_capable_nodes",door="http",model="gemma-3-270m",route="responses"} 1.0'
        in (scrape)
    )
