"""The gRPC door carries every chat field the HTTP door does: protobuf round trips lose nothing."""

from __future__ import annotations

import pytest

from common.errors import LlmlbError
from common.inference import (
    ChatMessage,
    ChatRequest,
    CompleteRequest,
    FinishReason,
    ResponseFormat,
    ResponseFormatType,
    SamplingParams,
    TextChunk,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    TopLogprob,
    Usage,
)
from common.inference_pb import (
    chat_request_from_pb,
    chat_request_to_pb,
    complete_request_from_pb,
    complete_request_to_pb,
    text_chunk_from_pb,
    text_chunk_to_pb,
)
from common.pb.llmlb.v1 import inference_pb2 as ipb

SCHEMA = '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'


def test_chat_request_round_trip_keeps_tools_formats_and_history() -> None:
    request = ChatRequest(
        model="m",
        messages=(
            ChatMessage("user", "weather?"),
            ChatMessage("assistant", "", tool_calls=(ToolCall(0, "call_1", "weather", '{"city":"Oslo"}'),)),
            ChatMessage("tool", "rain", tool_call_id="call_1"),
        ),
        params=SamplingParams(
            max_tokens=5,
            response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, SCHEMA, "thing", True),
            logprobs=True,
            top_logprobs=3,
            n=2,
        ),
        request_id="r",
        tools=(Tool("weather", "the weather", '{"type":"object"}', True),),
        tool_choice=ToolChoice(ToolChoiceMode.FUNCTION, "weather"),
        parallel_tool_calls=False,
    )
    assert chat_request_from_pb(chat_request_to_pb(request)) == request


def test_unset_fields_take_the_defaults() -> None:
    request = chat_request_from_pb(
        ipb.ChatRequest(model="m", messages=[ipb.ChatMessage(role="user", content="x")])
    )
    assert request.params.n == 1
    assert request.params.response_format == ResponseFormat()
    assert request.tool_choice == ToolChoice()
    assert request.parallel_tool_calls is True
    complete = CompleteRequest(model="m", prompt="p", params=SamplingParams(logprobs=True, top_logprobs=2))
    assert complete_request_from_pb(complete_request_to_pb(complete)) == complete


def test_text_chunk_round_trip_keeps_choice_logprobs_and_tool_calls() -> None:
    chunk = TextChunk(
        request_id="r",
        delta="hi",
        finish_reason=FinishReason.TOOL_CALLS,
        usage=Usage(3, 4, 1),
        index=2,
        logprobs=(
            TokenLogprob("hi", -0.5, b"hi", (TopLogprob("hi", -0.5, b"hi"), TopLogprob("yo", -1.5, b"yo"))),
        ),
        tool_calls=(ToolCall(0, "call_1", "weather", '{"ci'),),
    )
    assert text_chunk_from_pb(text_chunk_to_pb(chunk)) == chunk


def test_unknown_enum_numbers_are_refused() -> None:
    msg = ipb.ChatRequest(model="m", messages=[ipb.ChatMessage(role="user", content="x")])
    msg.tool_choice.mode = 9  # type: ignore[assignment]
    with pytest.raises(LlmlbError, match=r"tool_choice\.mode 9 is unknown"):
        chat_request_from_pb(msg)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(n=0), "n must be between 1 and 8"),
        (SamplingParams(n=9), "n must be between 1 and 8"),
        (SamplingParams(logprobs=True, top_logprobs=21), "top_logprobs must be between 0 and 20"),
        (SamplingParams(top_logprobs=2), "top_logprobs needs logprobs"),
    ],
)
def test_sampling_limits(params: SamplingParams, message: str) -> None:
    with pytest.raises(LlmlbError, match=message):
        params.validate()
