"""OpenAI JSON in, internal requests out; internal answers out as JSON the official `openai` client parses."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from openai.types import Completion, CreateEmbeddingResponse, ImagesResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from balancer.edge.admission import admit
from balancer.http import openai_answers as out
from balancer.http import openai_requests as cv
from balancer.http.errors import error_response, retry_after
from balancer.http.schemas import (
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    ImageGenerationBody,
    SpeechBody,
)
from common.errors import ErrorCode, LlmlbError
from common.inference import (
    AudioFormat,
    ChatMessage,
    EmbedResponse,
    FinishReason,
    GeneratedImage,
    GenerateImageResponse,
    ImageOperation,
    ResponseFormat,
    ResponseFormatType,
    TextChunk,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    Usage,
)


def chat_body(**fields: object) -> ChatCompletionBody:
    payload = {"model": "Gemma-3-270M", "messages": [{"role": "user", "content": "hi"}], **fields}
    return cv.parse_body(ChatCompletionBody, json.dumps(payload).encode())


def refused(code: ErrorCode, fn: object, *args: object) -> str:
    with pytest.raises(LlmlbError) as err:
        fn(*args)  # type: ignore[operator]
    assert err.value.code is code
    return err.value.message


# -- requests ----------------------------------------------------------------------------------------


def test_a_chat_body_becomes_a_chat_request_with_every_sampling_control() -> None:
    body = chat_body(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": None},
        ],
        max_tokens=99,
        max_completion_tokens=7,
        temperature=0,
        top_p=0.5,
        stop="END",
        seed=3,
        presence_penalty=0.1,
        frequency_penalty=-0.2,
        user="u1",
        n=1,
        some_future_field={"ignored": True},
    )
    request = cv.chat_request(body, "rid-1")
    assert request.model == "Gemma-3-270M"  # as sent: the edge's admission puts it in normal form
    assert admit(request).model == "gemma-3-270m"  # ids are case-insensitive, stored lower-cased
    assert request.messages == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "one\ntwo"),
        ChatMessage("assistant", ""),
    )
    params = request.params
    assert (params.max_tokens, params.temperature, params.top_p, params.stop, params.seed) == (
        7,
        0.0,
        0.5,
        ("END",),
        3,
    )
    assert (params.presence_penalty, params.frequency_penalty) == (0.1, -0.2)
    assert (request.request_id, request.user) == ("rid-1", "u1")


def test_response_formats_tools_and_tool_history_become_the_internal_fields() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = cv.chat_request(
        chat_body(
            messages=[
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": 1}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            tools=[{"type": "function", "function": {"name": "f", "description": "d", "parameters": schema}}],
            tool_choice={"type": "function", "function": {"name": "f"}},
            parallel_tool_calls=False,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": schema, "strict": True},
            },
        ),
        "r",
    )
    assert request.tools == (Tool("f", "d", json.dumps(schema)),)
    assert request.tool_choice == ToolChoice(ToolChoiceMode.FUNCTION, "f")
    assert request.parallel_tool_calls is False
    assert request.messages[1].tool_calls == (ToolCall(0, "call_1", "f", '{"a": 1}'),)
    assert request.messages[2].tool_call_id == "call_1"
    assert request.params.response_format == ResponseFormat(
        ResponseFormatType.JSON_SCHEMA, json.dumps(schema), "n", True
    )
    assert cv.chat_request(chat_body(tool_choice="required"), "r").tool_choice.mode is ToolChoiceMode.REQUIRED
    json_object = cv.chat_request(chat_body(response_format={"type": "json_object"}), "r")
    assert json_object.params.response_format.type is ResponseFormatType.JSON_OBJECT


def test_max_tokens_is_used_when_max_completion_tokens_is_absent() -> None:
    assert cv.chat_request(chat_body(max_tokens=5, stop=["a", "b"]), "r").params.max_tokens == 5
    assert cv.chat_request(chat_body(), "r").params.max_tokens is None


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        (
            {"tools": [{"type": "custom", "function": {"name": "f"}}]},
            "tools.0.type 'custom' is not supported",
        ),
        ({"response_format": {"type": "regex"}}, "response_format.type 'regex' is not supported"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
        ({"tool_choice": "sometimes"}, "tool_choice 'sometimes' is not supported"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "only text content",
        ),
    ],
)
def test_chat_features_no_runtime_has_are_refused_with_a_clear_message(
    fields: dict[str, object], fragment: str
) -> None:
    message = refused(ErrorCode.INVALID_REQUEST, cv.chat_request, chat_body(**fields), "r")
    assert fragment in message


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"model": "m"}', "missing required parameter: 'messages'"),
        (b'{"model": "m", "messages": [], "temperature": "hot"}', "'temperature'"),
        (b'{"model": 7, "messages": []}', "'model'"),
        (b'{"model": "m", "messages": [], "stream": "yes"}', "'stream'"),
    ],
)
def test_broken_or_mistyped_bodies_are_invalid_requests_naming_the_parameter(
    body: bytes, fragment: str
) -> None:
    assert fragment in refused(ErrorCode.INVALID_REQUEST, cv.parse_body, ChatCompletionBody, body)


def test_a_bad_model_id_is_invalid_model_id_at_admission() -> None:
    for bad in ("../etc/passwd", "a" * 257, "/abs"):
        refused(ErrorCode.INVALID_MODEL_ID, admit, cv.chat_request(chat_body(model=bad), "r"))


def test_completions_default_to_sixteen_tokens_and_take_one_prompt() -> None:
    body = cv.parse_body(CompletionBody, b'{"model": "m", "prompt": ["Once"], "echo": true}')
    request = cv.complete_request(body, "r")
    assert (request.prompt, request.params.max_tokens, request.echo) == ("Once", 16, True)
    two = cv.parse_body(CompletionBody, b'{"model": "m", "prompt": ["a", "b"]}')
    assert "one prompt" in refused(ErrorCode.INVALID_REQUEST, cv.complete_request, two, "r")


def test_embeddings_take_a_string_or_a_list_of_strings() -> None:
    one = cv.embed_request(cv.parse_body(EmbeddingBody, b'{"model": "m", "input": "a"}'), "r")
    many = cv.parse_body(EmbeddingBody, b'{"model": "m", "input": ["a", "b"], "dimensions": 8}')
    assert one.input == ("a",)
    assert (cv.embed_request(many, "r").input, many.dimensions) == (("a", "b"), 8)
    refused(ErrorCode.INVALID_REQUEST, cv.parse_body, EmbeddingBody, b'{"model": "m", "input": [[1, 2]]}')


def test_speech_is_wav_by_default_pcm_on_request_and_other_formats_are_refused() -> None:
    def speech(**fields: object) -> SpeechBody:
        return cv.parse_body(SpeechBody, json.dumps({"model": "v", "input": "Hi.", **fields}).encode())

    assert cv.speak_request(speech(), "r").format is AudioFormat.WAV
    pcm = cv.speak_request(speech(response_format="pcm", voice="joe", speed=1.5), "r")
    assert (pcm.format, pcm.voice, pcm.speed) == (AudioFormat.PCM, "joe", 1.5)
    message = refused(ErrorCode.INVALID_REQUEST, cv.speak_request, speech(response_format="mp3"), "r")
    assert "'mp3'" in message and "wav" in message and "pcm" in message


def test_transcription_forms_parse_numbers_and_require_a_model() -> None:
    form = {"model": "whisper-base", "language": "en", "temperature": "0.2", "prompt": "fox"}
    request = cv.transcribe_request(form, b"RIFF", "clip.wav", "r")
    assert (request.model, request.language, request.temperature, request.prompt) == (
        "whisper-base",
        "en",
        0.2,
        "fox",
    )
    refused(ErrorCode.INVALID_REQUEST, cv.transcribe_request, {**form, "temperature": "warm"}, b"x", "", "r")
    no_model = cv.transcribe_request({"language": "en"}, b"x", "", "r")
    assert "'model'" in refused(ErrorCode.INVALID_REQUEST, admit, no_model)


def test_image_sizes_and_formats() -> None:
    assert cv.image_size("512x768") == (512, 768)
    assert cv.image_size("auto") == cv.image_size(None) == (0, 0)
    refused(ErrorCode.INVALID_REQUEST, cv.image_size, "big")
    body = cv.parse_body(ImageGenerationBody, b'{"model": "sd", "prompt": "a cat", "n": 2, "size": "64x128"}')
    request = cv.generate_image_request(body, "r")
    assert (request.n, request.width, request.height, request.operation) == (
        2,
        64,
        128,
        ImageOperation.GENERATE,
    )
    url = cv.parse_body(ImageGenerationBody, b'{"model": "sd", "prompt": "a cat", "response_format": "url"}')
    assert "b64_json" in refused(ErrorCode.INVALID_REQUEST, cv.generate_image_request, url, "r")
    edit = cv.image_form_request({"model": "sd", "prompt": "hat"}, ImageOperation.EDIT, b"png", b"", "r")
    assert (edit.operation, edit.image, edit.prompt) == (ImageOperation.EDIT, b"png", "hat")


# -- answers -----------------------------------------------------------------------------------------


def events(raw: list[bytes]) -> list[dict[str, object]]:
    out = []
    for event in raw:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        out.append(json.loads(event[6:]))
    return out


def test_a_chat_stream_starts_with_the_assistant_role_and_ends_with_finish_reason_and_usage() -> None:
    encoder = out.ChatChunks("chatcmpl-1", 1700000000, "gemma-3-270m", include_usage=True)
    first = TextChunk("1", "Hel")
    last = TextChunk("1", "lo", FinishReason.LENGTH, Usage(3, 2))
    raw = encoder.events(first, True) + encoder.events(last, False)
    parsed = [ChatCompletionChunk.model_validate(e) for e in events(raw)]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == "Hello"
    assert [c.choices[0].finish_reason for c in parsed if c.choices] == [None, None, None, "length"]
    assert parsed[-1].choices == [] and parsed[-1].usage is not None
    assert (parsed[-1].usage.prompt_tokens, parsed[-1].usage.total_tokens) == (3, 5)
    assert all(c.usage is None for c in parsed[:-1])


def test_tool_calls_take_openais_shapes_whole_and_streamed() -> None:
    pieces = [
        TextChunk("1", "", tool_calls=(ToolCall(0, "call_a", "f", ""), ToolCall(0, arguments='{"a"'))),
        TextChunk("1", "", tool_calls=(ToolCall(0, arguments=": 1}"), ToolCall(1, "call_b", "g", "{}"))),
        TextChunk("1", "", FinishReason.TOOL_CALLS, Usage(5, 9)),
    ]
    choices, _ = out.join_choices(pieces)
    calls = out.joined_tool_calls(choices[0].tool_calls)
    assert calls == (ToolCall(0, "call_a", "f", '{"a": 1}'), ToolCall(1, "call_b", "g", "{}"))
    whole = ChatCompletion.model_validate(
        out.chat_completion_json("chatcmpl-1", 1, "m", choices, out.usage_of(pieces))
    )
    message = whole.choices[0].message
    assert message.content is None and whole.choices[0].finish_reason == "tool_calls"
    assert [
        (c.id, c.type, c.function.name, c.function.arguments)
        for c in message.tool_calls or []
        if c.type == "function"
    ] == [
        ("call_a", "function", "f", '{"a": 1}'),
        ("call_b", "function", "g", "{}"),
    ]

    encoder = out.ChatChunks("chatcmpl-1", 1, "m", include_usage=False)
    raw = [e for i, chunk in enumerate(pieces) for e in encoder.events(chunk, i == 0)]
    parsed = [ChatCompletionChunk.model_validate(e) for e in events(raw)]
    deltas = [d for c in parsed for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.id, d.type, d.function and d.function.name) for d in deltas] == [
        (0, "call_a", "function", "f"),
        (0, None, None, None),
        (1, "call_b", "function", "g"),
    ]
    assert "".join(d.function.arguments or "" for d in deltas if d.function and d.index == 0) == '{"a": 1}'
    assert parsed[-1].choices[0].finish_reason == "tool_calls"


def test_a_chat_stream_without_include_usage_has_no_usage_chunk() -> None:
    encoder = out.ChatChunks("chatcmpl-1", 1, "m", include_usage=False)
    raw = encoder.events(TextChunk("1", "", FinishReason.STOP, Usage(1, 1)), True)
    parsed = events(raw)
    assert len(parsed) == 2 and "usage" not in parsed[-1]


def test_a_completion_stream_carries_text_and_the_last_finish_reason() -> None:
    encoder = out.CompletionChunks("cmpl-1", 1, "m", include_usage=False)
    raw = encoder.events(TextChunk("1", "five"), True) + encoder.events(
        TextChunk("1", "", FinishReason.STOP, Usage(4, 1)), False
    )
    parsed = events(raw)
    choices = [e["choices"][0] for e in parsed]  # type: ignore[index]
    assert [(c["text"], c["finish_reason"]) for c in choices] == [("five", None), ("", "stop")]
    assert {e["object"] for e in parsed} == {"text_completion"}
    Completion.model_validate(parsed[-1])  # null finish_reasons mid-stream are OpenAI's too


def test_whole_answers_parse_as_the_openai_client_objects() -> None:
    chunks = [TextChunk("1", "Hi"), TextChunk("1", "!", FinishReason.STOP, Usage(5, 2), node_id="n1")]
    choices, _ = out.join_choices(chunks)
    answer = out.chat_completion_json("chatcmpl-1", 7, "m", choices, out.usage_of(chunks))
    chat = ChatCompletion.model_validate(answer)
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == ("Hi!", "stop")
    assert chat.usage is not None and chat.usage.total_tokens == 7
    [five], _ = out.join_choices([TextChunk("1", "five", FinishReason.STOP)])
    text = Completion.model_validate(out.text_completion_json("cmpl-1", 7, "m", [five], None))
    assert (text.object, text.choices[0].text, text.choices[0].finish_reason) == (
        "text_completion",
        "five",
        "stop",
    )


def test_base64_embeddings_are_little_endian_float32_like_openai() -> None:
    result = EmbedResponse("m", ((0.5, -1.25), (2.0, 0.0)), Usage(prompt_tokens=4))
    as_floats = CreateEmbeddingResponse.model_validate(out.embeddings_json(result, "m", "float"))
    assert [d.embedding for d in as_floats.data] == [[0.5, -1.25], [2.0, 0.0]]
    assert as_floats.usage.prompt_tokens == 4
    as_base64 = out.embeddings_json(result, "m", "base64")
    decoded = base64.b64decode(as_base64["data"][1]["embedding"])
    assert struct.unpack("<2f", decoded) == (2.0, 0.0)


def test_images_are_returned_as_b64_json() -> None:
    result = GenerateImageResponse((GeneratedImage(b"\x89PNG", seed=1, revised_prompt="cat"),))
    parsed = ImagesResponse.model_validate(out.images_json(result, 9))
    assert parsed.data is not None and base64.b64decode(parsed.data[0].b64_json or "") == b"\x89PNG"


def test_a_mid_stream_error_is_an_sse_error_event() -> None:
    [event] = events([out.sse_error(LlmlbError(ErrorCode.TIMEOUT, "too slow"))])
    assert event == {
        "error": {"message": "too slow", "type": "timeout_error", "code": "timeout", "param": None}
    }


def test_retry_after_is_whole_seconds_of_at_least_one() -> None:
    assert retry_after(LlmlbError(ErrorCode.QUEUE_FULL, "busy")) == "1"
    assert retry_after(LlmlbError(ErrorCode.QUEUE_FULL, "busy", retry_after_s=0.2)) == "1"
    assert retry_after(LlmlbError(ErrorCode.NO_CAPABLE_NODES, "x", retry_after_s=2.5)) == "3"
    assert retry_after(LlmlbError(ErrorCode.MODEL_NOT_FOUND, "x")) is None
    response = error_response(LlmlbError(ErrorCode.QUEUE_FULL, "busy", retry_after_s=4))
    assert (response.status_code, response.headers["retry-after"]) == (429, "4")
    assert json.loads(bytes(response.body))["error"]["type"] == "rate_limit_error"
