"""Log-probabilities and n choices: the log-softmax helper, the OpenAI request mapping and answer shapes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from balancer.edge.admission import admit
from balancer.http import openai_answers as out
from balancer.http import openai_requests as cv
from balancer.http.schemas import ChatCompletionBody, CompletionBody
from common.errors import ErrorCode, LlmlbError
from common.inference import FinishReason, TextChunk, TokenLogprob, TopLogprob, Usage
from node.runtimes.logprobs import log_normalizer, log_softmax, token_logprob, token_text, top_indices

# -- the log-softmax helper --------------------------------------------------------------------------


def test_log_softmax_is_a_normalized_log_distribution_even_for_huge_logits() -> None:
    logits = np.array([1000.0, 999.0, 990.0, -50.0], dtype=np.float32)
    result = log_softmax(logits)
    assert math.isclose(float(np.sum(np.exp(result))), 1.0, rel_tol=1e-9)
    assert all(result <= 0)
    # log-softmax differences are the logits' differences
    assert math.isclose(float(result[0] - result[1]), 1.0, rel_tol=1e-6)
    expected = -math.log(1 + math.exp(-1) + math.exp(-10) + math.exp(-1050))
    assert math.isclose(float(result[0]), expected, rel_tol=1e-6)


def test_the_normalizer_matches_a_direct_computation() -> None:
    logits = np.random.default_rng(7).normal(0, 4, 5000).astype(np.float32)
    direct = math.log(float(np.sum(np.exp(logits.astype(np.float64)))))
    assert math.isclose(log_normalizer(logits), direct, rel_tol=1e-6)


def test_top_indices_are_the_likeliest_best_first_with_ties_to_the_lower_id() -> None:
    scores = np.array([0.5, 3.0, -1.0, 3.0, 2.0, -40.0], dtype=np.float32)
    assert top_indices(scores, 3) == [1, 3, 4]
    assert top_indices(scores, 0) == []
    assert top_indices(scores, 99) == [1, 3, 4, 0, 2, 5]  # more than near the top: all, ranked


def test_a_token_inside_a_multibyte_character_shows_its_bytes() -> None:
    assert token_text("é".encode()) == "é"
    assert token_text(b"\xe2\x80") == "\\xe2\\x80"


def test_token_logprob_reports_the_chosen_token_and_ranked_alternatives() -> None:
    pieces = {0: b"a", 1: b"b", 2: b"\xc3", 3: b"d"}
    logits = np.array([2.0, 0.0, 1.0, -3.0], dtype=np.float32)
    entry = token_logprob(logits, 1, 2, pieces.__getitem__)
    expected = log_softmax(logits)
    assert (entry.token, entry.bytes) == ("b", b"b")
    assert math.isclose(entry.logprob, float(expected[1]), rel_tol=1e-6)
    assert [(t.token, t.bytes) for t in entry.top_logprobs] == [("a", b"a"), ("\\xc3", b"\xc3")]
    assert [round(t.logprob, 5) for t in entry.top_logprobs] == [round(float(x), 5) for x in expected[[0, 2]]]
    assert token_logprob(logits, 0, 0, pieces.__getitem__).top_logprobs == ()


def test_a_masked_token_gets_openais_floor_not_minus_infinity() -> None:
    logits = np.array([0.0, -np.inf, 1.0], dtype=np.float32)
    entry = token_logprob(logits, 1, 3, lambda i: b"x")
    assert entry.logprob == -9999.0 and entry.top_logprobs[-1].logprob == -9999.0


# -- requests ------------------------------------------------------------------------------------------


def chat_body(**fields: object) -> ChatCompletionBody:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return cv.parse_body(ChatCompletionBody, json.dumps(payload).encode())


def completion_body(**fields: object) -> CompletionBody:
    return cv.parse_body(CompletionBody, json.dumps({"model": "m", "prompt": "Once", **fields}).encode())


def refused(call: object, *args: object) -> str:
    with pytest.raises(LlmlbError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    return caught.value.message


def test_chat_logprobs_top_logprobs_and_n_reach_the_sampling_params() -> None:
    params = cv.chat_request(chat_body(logprobs=True, top_logprobs=3, n=2), "r").params
    assert (params.logprobs, params.top_logprobs, params.n) == (True, 3, 2)
    plain = cv.chat_request(chat_body(), "r").params
    assert (plain.logprobs, plain.top_logprobs, plain.n) == (False, 0, 1)


def test_a_legacy_completions_logprobs_count_means_logprobs_with_that_many_alternatives() -> None:
    assert cv.complete_request(completion_body(logprobs=2), "r").params.top_logprobs == 2
    zero = cv.complete_request(completion_body(logprobs=0), "r").params
    assert (zero.logprobs, zero.top_logprobs) == (True, 0)
    assert "between 0 and 5" in refused(cv.complete_request, completion_body(logprobs=6), "r")
    assert "'logprobs'" in refused(
        cv.parse_body, CompletionBody, b'{"model":"m","prompt":"a","logprobs":true}'
    )


def test_best_of_must_equal_n_and_echo_cannot_come_with_logprobs() -> None:
    assert cv.complete_request(completion_body(n=3, best_of=3), "r").params.n == 3
    assert "best_of must equal n" in refused(cv.complete_request, completion_body(n=2, best_of=4), "r")
    both = cv.complete_request(completion_body(echo=True, logprobs=1), "r")
    assert "echo with logprobs" in refused(admit, both)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"n": 0}, "n must be between 1 and 8"),
        ({"n": 9}, "n must be between 1 and 8"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be between 0 and 20"),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
    ],
)
def test_out_of_range_choices_and_logprobs_are_refused_at_admission(
    fields: dict[str, object], fragment: str
) -> None:
    assert fragment in refused(admit, cv.chat_request(chat_body(**fields), "r"))


# -- answers -------------------------------------------------------------------------------------------

HI = TokenLogprob("Hi", -0.25, b"Hi", (TopLogprob("Hi", -0.25, b"Hi"), TopLogprob("Hey", -1.5, b"Hey")))
BANG = TokenLogprob("!", -0.5, b"!", (TopLogprob("!", -0.5, b"!"), TopLogprob(".", -1.0, b".")))


def events(raw: list[bytes]) -> list[dict[str, object]]:
    return [json.loads(event.removeprefix(b"data: ")) for event in raw]


def two_choices() -> list[TextChunk]:
    """Two choices of "Hi!", the second's pieces interleaved with the first's, as a node may send them."""
    return [
        TextChunk("1", "Hi", logprobs=(HI,)),
        TextChunk("1", "Hi", index=1, logprobs=(HI,)),
        TextChunk("1", "!", FinishReason.STOP, index=1, logprobs=(BANG,)),
        TextChunk("1", "!", FinishReason.LENGTH, Usage(4, 4), logprobs=(BANG,)),
    ]


def test_a_whole_chat_answer_has_every_choice_in_index_order_with_its_logprobs() -> None:
    chunks = two_choices()
    choices, _ = out.join_choices(chunks)
    answer = ChatCompletion.model_validate(
        out.chat_completion_json("chatcmpl-1", 7, "m", choices, out.usage_of(chunks), logprobs=True)
    )
    assert [(c.index, c.message.content, c.finish_reason) for c in answer.choices] == [
        (0, "Hi!", "length"),
        (1, "Hi!", "stop"),
    ]
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (4, 4)
    for choice in answer.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert [(t.token, t.logprob, t.bytes) for t in choice.logprobs.content] == [
            ("Hi", -0.25, [72, 105]),
            ("!", -0.5, [33]),
        ]
        assert [t.token for t in choice.logprobs.content[0].top_logprobs] == ["Hi", "Hey"]
    plain = out.chat_completion_json("chatcmpl-1", 7, "m", choices, None)
    assert [c["logprobs"] for c in plain["choices"]] == [None, None]


def test_a_chat_stream_starts_each_choice_with_the_role_and_ends_with_one_usage_event() -> None:
    encoder = out.ChatChunks("chatcmpl-1", 1, "m", include_usage=True, logprobs=True)
    raw = [event for i, chunk in enumerate(two_choices()) for event in encoder.events(chunk, i == 0)]
    parsed = [ChatCompletionChunk.model_validate(e) for e in events(raw)]
    with_choice = [c.choices[0] for c in parsed if c.choices]
    roles = [(c.index, c.delta.role) for c in with_choice if c.delta.role]
    assert roles == [(0, "assistant"), (1, "assistant")]
    for index in (0, 1):
        mine = [c for c in with_choice if c.index == index]
        assert "".join(c.delta.content or "" for c in mine) == "Hi!"
        tokens = [t.token for c in mine if c.logprobs and c.logprobs.content for t in c.logprobs.content]
        assert tokens == ["Hi", "!"]
        assert [c.finish_reason for c in mine if c.finish_reason] == ["stop" if index else "length"]
    assert [c.usage is not None for c in parsed] == [False] * (len(parsed) - 1) + [True]
    assert parsed[-1].choices == []


def test_a_legacy_completion_has_parallel_token_lists_and_character_offsets() -> None:
    e_acute = TokenLogprob("\\xc3", -1.0, b"\xc3")
    rest = TokenLogprob("\\xa9", -0.1, b"\xa9")
    tail = TokenLogprob("t", -0.2, b"t", (TopLogprob("t", -0.2, b"t"),))
    chunks = [
        TextChunk("1", "", logprobs=(e_acute,)),
        TextChunk("1", "ét", FinishReason.STOP, logprobs=(rest, tail)),
    ]
    choices, _ = out.join_choices(chunks)
    answer = Completion.model_validate(
        out.text_completion_json("cmpl-1", 7, "m", choices, None, logprobs=True)
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["\\xc3", "\\xa9", "t"]
    assert logprobs.token_logprobs == [-1.0, -0.1, -0.2]
    assert logprobs.top_logprobs == [{}, {}, {"t": -0.2}]
    assert logprobs.text_offset == [0, 0, 1]  # both halves of "é" start where it starts


def test_a_streamed_completion_keeps_offsets_per_choice() -> None:
    encoder = out.CompletionChunks("cmpl-1", 1, "m", include_usage=False, logprobs=True)
    a = TokenLogprob("ab", -0.1, b"ab")
    c = TokenLogprob("c", -0.2, b"c")
    raw = []
    for chunk in (
        TextChunk("1", "ab", logprobs=(a,)),
        TextChunk("1", "ab", index=1, logprobs=(a,)),
        TextChunk("1", "c", FinishReason.STOP, index=1, logprobs=(c,)),
        TextChunk("1", "c", FinishReason.STOP, Usage(1, 4), logprobs=(c,)),
    ):
        raw += encoder.events(chunk, False)
    choices = [e["choices"][0] for e in events(raw)]  # type: ignore[index]
    offsets = [(c["index"], c["logprobs"]["text_offset"]) for c in choices]
    assert offsets == [(0, [0]), (1, [0]), (1, [2]), (0, [2])]
