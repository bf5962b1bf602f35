"""Structured outputs and tool calls through both doors, against a real gemma node.

One balancer and one node for the whole module (started once, the model loaded once), greedy decoding
and small answers, so the file runs in well under a minute. The answers are checked the way a caller
would check them: parsed, and validated against the schema that was asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import grpc
import jsonschema  # type: ignore[import-untyped]
import openai
import pydantic
import pytest

from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from devkit.model_files import ModelFiles
from tests.integration.conftest import BalancerProcess, packaged_models_fleet

pytestmark = pytest.mark.slow
GEMMA = "gemma-3-270m"

ANSWER = {
    "type": "object",
    "properties": {
        "topic": {"enum": ["science", "history", "food", "sport", "other"]},
        "sure": {"type": "boolean"},
    },
    "required": ["topic", "sure"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather now in a city", "parameters": WEATHER},
}
CLOCK_TOOL: Any = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
PROMPTS = [
    "What is the boiling point of water?",
    "Who built the pyramids?",
    "What is sushi made of?",
    "How many players are in a football team?",
    "Why is the sky blue?",
    "When did the Roman empire fall?",
    "What is the main ingredient of guacamole?",
    "Who won the first Tour de France?",
    "What is a black hole?",
    "Who was Napoleon?",
    "What is bread made from?",
    "How long is a marathon?",
    "What is photosynthesis?",
    "When was the printing press invented?",
    "What is a croissant?",
    "How is tennis scored?",
    "What is gravity?",
    "Who was Cleopatra?",
    "What do pandas eat?",
    "What colour is a ripe banana?",
]


class Verdict(pydantic.BaseModel):
    fruit: bool
    colour: Literal["red", "green", "yellow"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, gemma: ModelFiles) -> Iterator[BalancerProcess]:
    """A balancer and one node answering gemma from the packaged models' dir, once the node is online."""
    with packaged_models_fleet(tmp_path_factory.mktemp("structured")) as balancer:
        yield balancer


@pytest.fixture(scope="module")
def oai(fleet: BalancerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.http_url}/v1", api_key=fleet.admin_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def inference(fleet: BalancerProcess) -> igrpc.InferenceStub:
    assert fleet.channel is not None
    return igrpc.InferenceStub(fleet.channel)


def schema_format(schema: dict[str, Any], name: str = "answer") -> Any:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_json_schema_answers_parse_and_validate_for_twenty_prompts(oai: openai.OpenAI) -> None:
    for prompt in PROMPTS:
        reply = oai.chat.completions.create(
            model=GEMMA,
            messages=[{"role": "user", "content": prompt}],
            response_format=schema_format(ANSWER),
            max_tokens=40,
            temperature=0,
        )
        text = reply.choices[0].message.content or ""
        assert reply.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), ANSWER)


def test_parse_fills_a_pydantic_model_and_json_object_mode_gives_an_object(oai: openai.OpenAI) -> None:
    parsed = oai.chat.completions.parse(
        model=GEMMA,
        messages=[{"role": "user", "content": "Is a tomato a fruit?"}],
        response_format=Verdict,
        max_tokens=40,
        temperature=0,
    )
    verdict = parsed.choices[0].message.parsed
    assert isinstance(verdict, Verdict)

    reply = oai.chat.completions.create(
        model=GEMMA,
        messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        response_format={"type": "json_object"},
        max_tokens=24,
        temperature=0,
    )
    # Any object, but it may be cut by max_tokens: only a finished one must parse.
    text = reply.choices[0].message.content or ""
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)

    completion = oai.completions.create(
        model=GEMMA,
        prompt="A city as JSON:",
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": schema_format(WEATHER)},
    )
    jsonschema.validate(json.loads(completion.choices[0].text), WEATHER)


def test_a_forced_tool_call_has_arguments_that_validate_whole_and_streamed(oai: openai.OpenAI) -> None:
    asked: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced: Any = {"type": "function", "function": {"name": "get_weather"}}
    reply = oai.chat.completions.create(
        model=GEMMA,
        messages=asked,
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice=forced,
        max_tokens=40,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)

    stream = oai.chat.completions.create(
        model=GEMMA,
        messages=asked,
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice=forced,
        max_tokens=40,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0] for c in stream if c.choices]
    deltas = [p for c in pieces for p in (c.delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert arguments == calls[0].function.arguments  # greedy: the same call both ways
    assert pieces[-1].finish_reason == "tool_calls"
    assert not any(p.delta.content for p in pieces)

    required = oai.chat.completions.create(
        model=GEMMA,
        messages=asked,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=40,
        temperature=0,
    )
    named = [c.function.name for c in required.choices[0].message.tool_calls or [] if c.type == "function"]
    assert named[:1] == ["get_weather"]


def test_a_conversation_continues_after_a_tool_result(oai: openai.OpenAI) -> None:
    call_id = "call_weather1"
    history: Any = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    reply = oai.chat.completions.create(
        model=GEMMA, messages=history, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=16, temperature=0
    )
    choice = reply.choices[0]
    assert (choice.message.content or "").strip() and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")


def test_what_a_grammar_cannot_enforce_is_refused_on_both_doors(
    oai: openai.OpenAI, inference: igrpc.InferenceStub
) -> None:
    asked: Any = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(
            model=GEMMA,
            messages=asked,
            response_format=schema_format(
                {"type": "object", "patternProperties": {"^x": {"type": "string"}}}
            ),
        )
    assert "'patternProperties' is not supported" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(
            model=GEMMA,
            messages=asked,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    assert "'get_time', which is not in tools" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        bad: Any = {"type": "function", "function": {"name": "get weather!", "parameters": WEATHER}}
        oai.chat.completions.create(model=GEMMA, messages=asked, tools=[bad])
    assert "tools.0.function.name" in refused.value.message

    message = [ipb.ChatMessage(role="user", content="Hi")]
    cases = [
        (
            ipb.ChatRequest(
                model=GEMMA,
                messages=message,
                params=ipb.SamplingParams(
                    response_format=ipb.ResponseFormat(
                        type=ipb.ResponseFormat.TYPE_JSON_SCHEMA, schema='{"type": "integer", "minimum": 3}'
                    )
                ),
            ),
            "'minimum' is not supported",
        ),
        (
            ipb.ChatRequest(
                model=GEMMA,
                messages=message,
                tools=[ipb.Tool(name="get_weather", parameters=json.dumps(WEATHER))],
                tool_choice=ipb.ToolChoice(mode=ipb.ToolChoice.MODE_FUNCTION, function="get_time"),
            ),
            "'get_time', which is not in tools",
        ),
        (
            ipb.ChatRequest(model=GEMMA, messages=message, tools=[ipb.Tool(name="get weather!")]),
            "tools.0.function.name",
        ),
    ]
    for request, says in cases:
        with pytest.raises(grpc.RpcError) as failed:
            list(inference.Chat(request, timeout=30))
        assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert says in (failed.value.details() or "")


def test_the_grpc_door_gives_schema_answers_and_forced_tool_calls(inference: igrpc.InferenceStub) -> None:
    request = ipb.ChatRequest(
        model=GEMMA,
        messages=[ipb.ChatMessage(role="user", content="Why is the sea salty?")],
        params=ipb.SamplingParams(
            max_tokens=40,
            temperature=0,
            response_format=ipb.ResponseFormat(
                type=ipb.ResponseFormat.TYPE_JSON_SCHEMA, schema=json.dumps(ANSWER)
            ),
        ),
    )
    chunks = list(inference.Chat(request, timeout=120))
    assert chunks[-1].finish_reason == ipb.FINISH_REASON_STOP
    jsonschema.validate(json.loads("".join(c.delta for c in chunks)), ANSWER)

    request = ipb.ChatRequest(
        model=GEMMA,
        messages=[ipb.ChatMessage(role="user", content="Weather in Oslo, please.")],
        params=ipb.SamplingParams(max_tokens=40, temperature=0),
        tools=[ipb.Tool(name="get_weather", description="The weather now", parameters=json.dumps(WEATHER))],
        tool_choice=ipb.ToolChoice(mode=ipb.ToolChoice.MODE_FUNCTION, function="get_weather"),
    )
    chunks = list(inference.Chat(request, timeout=120))
    pieces = [p for c in chunks for p in c.tool_calls]
    assert pieces[0].name == "get_weather" and pieces[0].id.startswith("call_")
    assert chunks[-1].finish_reason == ipb.FINISH_REASON_TOOL_CALLS
    assert not "".join(c.delta for c in chunks)
    jsonschema.validate(json.loads("".join(p.arguments for p in pieces)), WEATHER)
