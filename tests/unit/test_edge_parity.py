"""One table of bad and edge inputs through both doors: the same input gets the same error code.

Each case is written once as an OpenAI HTTP request and once as the matching gRPC call; both go to one
balancer with both doors open. The status each door answers must be the one the error table gives for
that code, and what the metrics show afterwards must not grow with names callers made up.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.errors import ERRORS, ErrorCode
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.types import Scope
from tests.fixtures.doors import CALL_TIMEOUT_S, Doors, grpc_error, http_error, open_doors, series

pytestmark = pytest.mark.timeout(120)

CHAT_MODEL = "gemma-3-270m"  # chat, completion, embeddings
AUDIO_MODEL = "whisper-base"  # transcription only
VOICE_MODEL = "piper-en-us-joe-medium"  # speech only
HI = [{"role": "user", "content": "Hi"}]
LONG_ID = "a" * 257
UNENFORCEABLE = {"type": "object", "patternProperties": {"^x": {"type": "string"}}}
TOOL = {"type": "function", "function": {"name": "f"}}
HttpCall = Callable[[Doors], Awaitable[Any]]
GrpcCall = Callable[[Doors], Any]


@pytest.fixture
async def doors(tmp_path: Path) -> AsyncIterator[Doors]:
    async with open_doors(tmp_path / "balancer") as opened:
        yield opened


def _chat(model: str, messages: list[dict[str, str]] | None = None, **extra: Any) -> HttpCall:
    body = {"model": model, "messages": HI if messages is None else messages, **extra}
    return lambda d: d.http.post("/v1/chat/completions", json=body, headers=d.headers(Scope.API))


def _grpc_chat(model: str, roles: tuple[tuple[str, str], ...] = (("user", "Hi"),), **fields: Any) -> GrpcCall:
    messages = [ipb.ChatMessage(role=r, content=c) for r, c in roles]
    request = ipb.ChatRequest(model=model, messages=messages, **fields)
    return lambda d: d.inference.Chat(request, timeout=CALL_TIMEOUT_S, metadata=d.metadata(Scope.API))


def _speech(model: str, text: str, **extra: Any) -> HttpCall:
    body = {"model": model, "input": text, **extra}
    return lambda d: d.http.post("/v1/audio/speech", json=body, headers=d.headers(Scope.API))


def _grpc_speak(model: str, text: str, **fields: Any) -> GrpcCall:
    request = ipb.SpeakRequest(model=model, input=text, **fields)
    return lambda d: d.inference.Speak(request, timeout=CALL_TIMEOUT_S, metadata=d.metadata(Scope.API))


def _post(
    path: str, body: dict[str, Any], scope: Scope = Scope.API, headers: dict[str, str] | None = None
) -> HttpCall:
    return lambda d: d.http.post(path, json=body, headers={**d.headers(scope), **(headers or {})})


def _transcription(model: str, audio: bytes) -> HttpCall:
    return lambda d: d.http.post(
        "/v1/audio/transcriptions",
        data={"model": model},
        files={"file": ("clip.wav", audio, "audio/wav")},
        headers=d.headers(Scope.API),
    )


def _grpc(method: str, request: Any, scope: Scope = Scope.API) -> GrpcCall:
    return lambda d: getattr(
        d.registry if isinstance(request, rpb.RegisterModelRequest) else d.inference, method
    )(request, timeout=CALL_TIMEOUT_S, metadata=d.metadata(scope))


@dataclass(frozen=True)
class Case:
    name: str
    http: HttpCall
    grpc: GrpcCall
    code: ErrorCode


CASES = [
    Case(
        "traversal model id",
        _chat("../../etc/passwd"),
        _grpc_chat("../../etc/passwd"),
        ErrorCode.INVALID_MODEL_ID,
    ),
    Case("257-character model id", _chat(LONG_ID), _grpc_chat(LONG_ID), ErrorCode.INVALID_MODEL_ID),
    Case("model id with a space", _chat("gemma 3"), _grpc_chat("gemma 3"), ErrorCode.INVALID_MODEL_ID),
    Case("missing model", _chat(""), _grpc_chat(""), ErrorCode.INVALID_REQUEST),
    Case("unknown model", _chat("no-such-model"), _grpc_chat("no-such-model"), ErrorCode.MODEL_NOT_FOUND),
    Case(
        "model without the capability",
        _chat(AUDIO_MODEL),
        _grpc_chat(AUDIO_MODEL),
        ErrorCode.MODEL_NOT_FOUND,
    ),
    Case(
        "speech from a text model",
        _speech(CHAT_MODEL, "hello"),
        _grpc_speak(CHAT_MODEL, "hello"),
        ErrorCode.MODEL_NOT_FOUND,
    ),
    Case(
        "known model, no node",
        _chat(CHAT_MODEL.upper()),  # upper case is the same id
        _grpc_chat(CHAT_MODEL.upper()),
        ErrorCode.NO_CAPABLE_NODES,
    ),
    Case(
        "bad request id",
        _post(
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": HI},
            headers={"x-request-id": "has spaces"},
        ),
        _grpc_chat(CHAT_MODEL, request_id="has spaces"),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "129-character request id",
        _post(
            "/v1/chat/completions", {"model": CHAT_MODEL, "messages": HI}, headers={"x-request-id": "r" * 129}
        ),
        _grpc_chat(CHAT_MODEL, request_id="r" * 129),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "257-character prompt_cache_key on a chat",
        _chat(CHAT_MODEL, prompt_cache_key="k" * 257),
        _grpc_chat(CHAT_MODEL, prompt_cache_key="k" * 257),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "257-character prompt_cache_key on a completion",
        _post("/v1/completions", {"model": CHAT_MODEL, "prompt": "Hi", "prompt_cache_key": "k" * 257}),
        _grpc("Complete", ipb.CompleteRequest(model=CHAT_MODEL, prompt="Hi", prompt_cache_key="k" * 257)),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "over-long speech input",
        _speech(VOICE_MODEL, "x" * 4097),
        _grpc_speak(VOICE_MODEL, "x" * 4097),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "empty speech input",
        _speech(VOICE_MODEL, " "),
        _grpc_speak(VOICE_MODEL, " "),
        ErrorCode.INVALID_REQUEST,
    ),
    Case("no messages", _chat(CHAT_MODEL, []), _grpc_chat(CHAT_MODEL, ()), ErrorCode.INVALID_REQUEST),
    Case(
        "unknown message role",
        _chat(CHAT_MODEL, [{"role": "wizard", "content": "Hi"}]),
        _grpc_chat(CHAT_MODEL, (("wizard", "Hi"),)),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "empty prompt",
        _post("/v1/completions", {"model": CHAT_MODEL, "prompt": ""}),
        _grpc("Complete", ipb.CompleteRequest(model=CHAT_MODEL, prompt="")),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "empty embedding input",
        _post("/v1/embeddings", {"model": CHAT_MODEL, "input": []}),
        _grpc("Embed", ipb.EmbedRequest(model=CHAT_MODEL, input=[])),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "an empty string to embed",
        _post("/v1/embeddings", {"model": CHAT_MODEL, "input": ["ok", ""]}),
        _grpc("Embed", ipb.EmbedRequest(model=CHAT_MODEL, input=["ok", ""])),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "empty audio",
        _transcription(AUDIO_MODEL, b""),
        _grpc("Transcribe", ipb.TranscribeRequest(model=AUDIO_MODEL, audio=b"")),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "temperature out of range",
        _chat(CHAT_MODEL, temperature=7.5),
        _grpc_chat(CHAT_MODEL, params=ipb.SamplingParams(temperature=7.5)),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "max_tokens zero",
        _chat(CHAT_MODEL, max_tokens=0),
        _grpc_chat(CHAT_MODEL, params=ipb.SamplingParams(max_tokens=0)),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "too many choices",
        _chat(CHAT_MODEL, n=9),
        _grpc_chat(CHAT_MODEL, params=ipb.SamplingParams(n=9)),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "alternatives without logprobs",
        _chat(CHAT_MODEL, top_logprobs=2),
        _grpc_chat(CHAT_MODEL, params=ipb.SamplingParams(top_logprobs=2)),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "an audio format that does not exist",
        _speech(VOICE_MODEL, "hello", response_format="midi"),
        _grpc_speak(VOICE_MODEL, "hello", format=42),  # type: ignore[arg-type]
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        # Protobuf cannot carry a wrong type; its nearest is a number out of range.
        "a value of the wrong type",
        _chat(CHAT_MODEL, max_tokens="nine"),
        _grpc_chat(CHAT_MODEL, params=ipb.SamplingParams(max_tokens=-1)),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "an unknown capability in a registration",
        _post("/v0/models", {"repo_id": "org/repo", "capabilities": ["telepathy"]}, Scope.ADMIN),
        _grpc(
            "RegisterModel",
            rpb.RegisterModelRequest(repo_id="org/repo", capabilities=[99]),  # type: ignore[list-item]
            Scope.ADMIN,
        ),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "a schema construct no grammar enforces",
        _chat(
            CHAT_MODEL,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": UNENFORCEABLE}},
        ),
        _grpc_chat(
            CHAT_MODEL,
            params=ipb.SamplingParams(
                response_format=ipb.ResponseFormat(
                    type=ipb.ResponseFormat.TYPE_JSON_SCHEMA, schema=json.dumps(UNENFORCEABLE)
                )
            ),
        ),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "tool_choice naming a function not in tools",
        _chat(CHAT_MODEL, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}),
        _grpc_chat(
            CHAT_MODEL,
            tools=[ipb.Tool(name="f")],
            tool_choice=ipb.ToolChoice(mode=ipb.ToolChoice.MODE_FUNCTION, function="other"),
        ),
        ErrorCode.INVALID_REQUEST,
    ),
    Case(
        "a tool name with a space",
        _chat(CHAT_MODEL, tools=[{"type": "function", "function": {"name": "get weather"}}]),
        _grpc_chat(CHAT_MODEL, tools=[ipb.Tool(name="get weather")]),
        ErrorCode.INVALID_REQUEST,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_both_doors_answer_the_same_error_code(doors: Doors, case: Case) -> None:
    spec = ERRORS[case.code]
    status, http_err = http_error(await case.http(doors))
    grpc_status, grpc_err = await grpc_error(case.grpc(doors))
    assert (http_err.code, grpc_err.code) == (case.code, case.code), (http_err.message, grpc_err.message)
    assert (status, grpc_status) == (spec.http_status, spec.grpc_status)
    assert http_err.message and grpc_err.message


async def test_made_up_model_names_add_no_metrics_series_on_either_door(doors: Doors) -> None:
    families = (
        "llmlb_requests_total",
        "llmlb_tokens_total",
        "llmlb_request_duration_seconds",
        "llmlb_request_seconds",
    )
    # One refusal per door first: it adds the (model="") series every later refusal is counted in.
    for name in ("warm-up-a", "warm-up-b"):
        http_error(await _chat(name)(doors))
        await grpc_error(_grpc_chat(name)(doors))
    before = series(await doors.metrics_text(), families)
    for i in range(200):
        name = f"made-up-model-{i}"
        _, err = http_error(await _chat(name)(doors))
        assert err.code is ErrorCode.MODEL_NOT_FOUND
        _, err = await grpc_error(_grpc_chat(name)(doors))
        assert err.code is ErrorCode.MODEL_NOT_FOUND
    text = await doors.metrics_text()
    assert series(text, families) == before
    assert "made-up-model" not in text
    counted = [line for line in text.splitlines() if line.startswith("llmlb_requests_total{")]
    refused = [line for line in counted if 'model=""' in line and "model_not_found" in line]
    # Per door: the two warm-ups and the 200, all in one series.
    assert sorted(float(line.rsplit(" ", 1)[1]) for line in refused) == [202.0, 202.0]


async def test_a_known_model_is_a_label_on_both_doors(doors: Doors) -> None:
    http_error(await _chat(CHAT_MODEL)(doors))
    await grpc_error(_grpc_chat(CHAT_MODEL)(doors))
    text = await doors.metrics_text()
    labelled = {
        line.split("{", 1)[1].split("}", 1)[0]
        for line in text.splitlines()
        if line.startswith("llmlb_requests_total{")
    }
    for door in ("http", "grpc"):
        assert f'code="no_capable_nodes",door="{door}",model="{CHAT_MODEL}",route="chat"' in labelled
