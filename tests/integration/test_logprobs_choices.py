"""Log-probabilities and n choices through both doors, with the official ``openai`` client and the stubs.

One balancer and one real gemma-3-270m node serve the whole module (started once); answers are short.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from devkit.model_files import ModelFiles
from tests.integration.conftest import (
    BalancerProcess,
    packaged_models_fleet,
    sync_channel,
)

pytestmark = pytest.mark.slow
GEMMA = "gemma-3-270m"
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name a colour."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def balancer(gemma: ModelFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BalancerProcess]:
    """A balancer and one gemma node answering from the packaged models' dir, for the whole module."""
    with packaged_models_fleet(tmp_path_factory.mktemp("logprobs")) as balancer:
        yield balancer


@pytest.fixture(scope="module")
def oai(balancer: BalancerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{balancer.http_url}/v1", api_key=balancer.admin_key, max_retries=0, timeout=120
    )


def test_chat_logprobs_have_one_entry_per_token_with_the_alternatives_asked_for(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model=GEMMA, messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    [choice] = answer.choices
    assert answer.usage is not None and choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert b"".join(bytes(t.bytes or []) for t in content) == (choice.message.content or "").encode()
    for entry in content:
        assert entry.logprob <= 0
        ranked = [t.logprob for t in entry.top_logprobs]
        assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True)
        # greedy: the chosen token is the likeliest one
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)

    streamed = oai.chat.completions.create(
        model=GEMMA,
        messages=ASK,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens, usage = [], None
    for chunk in streamed:
        usage = chunk.usage or usage
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                tokens += c.logprobs.content
    assert usage is not None and len(tokens) == usage.completion_tokens
    assert [t.token for t in tokens] == [t.token for t in content]  # greedy: the same tokens
    assert all(len(t.top_logprobs) == 2 for t in tokens)


def test_completion_logprobs_are_parallel_lists_with_offsets(oai: openai.OpenAI) -> None:
    answer = oai.completions.create(model=GEMMA, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    [choice] = answer.choices
    logprobs = choice.logprobs
    assert answer.usage is not None and logprobs is not None and logprobs.tokens
    n = answer.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs or []) == len(logprobs.text_offset or []) == n
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(n)]
    assert all(lp <= 0 for lp in logprobs.token_logprobs or [])
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])

    # The tokens of a stop sequence are generated, so they are counted and listed, though cut from the text.
    stopped = oai.completions.create(
        model=GEMMA, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0, stop=[" of"]
    )
    [cut] = stopped.choices
    assert stopped.usage is not None and cut.logprobs is not None and cut.finish_reason == "stop"
    assert len(cut.logprobs.tokens or []) == stopped.usage.completion_tokens
    assert "".join(cut.logprobs.tokens or []) == cut.text + " of"


def test_n_chat_choices_each_with_an_index_and_usage_summed(oai: openai.OpenAI) -> None:
    one = oai.chat.completions.create(model=GEMMA, messages=ASK, max_tokens=4, temperature=0)
    three = oai.chat.completions.create(
        model=GEMMA, messages=ASK, max_tokens=4, temperature=1.0, seed=11, n=3, logprobs=True
    )
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(c.message.content and c.finish_reason in ("stop", "length") for c in three.choices)
    assert one.usage is not None and three.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    per_choice = [len(c.logprobs.content or []) for c in three.choices if c.logprobs]
    assert len(per_choice) == 3 and three.usage.completion_tokens == sum(per_choice)

    streamed = oai.chat.completions.create(
        model=GEMMA,
        messages=ASK,
        max_tokens=4,
        temperature=1.0,
        seed=11,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = defaultdict(str)
    finished: dict[int, str] = {}
    usage = None
    for chunk in streamed:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert sorted(finished) == [0, 1, 2]
    assert usage is not None and usage.completion_tokens == three.usage.completion_tokens
    # the same seeds give the same choices, streamed or not
    assert [texts[i] for i in range(3)] == [c.message.content for c in three.choices]


def test_n_completions_with_echo_each_begin_with_the_prompt(oai: openai.OpenAI) -> None:
    answer = oai.completions.create(
        model=GEMMA, prompt=PROMPT, max_tokens=4, temperature=0.9, seed=3, n=2, best_of=2, echo=True
    )
    assert [c.index for c in answer.choices] == [0, 1]
    assert all(c.text.startswith(PROMPT) and len(c.text) > len(PROMPT) for c in answer.choices)
    assert answer.usage is not None and answer.usage.completion_tokens <= 8
    with pytest.raises(openai.BadRequestError, match="best_of must equal n"):
        oai.completions.create(model=GEMMA, prompt=PROMPT, max_tokens=4, n=2, best_of=3)


def test_the_grpc_door_streams_logprobs_and_choices(balancer: BalancerProcess) -> None:
    with sync_channel(balancer.address, balancer.admin_key) as channel:
        stub = igrpc.InferenceStub(channel)
        params = ipb.SamplingParams(max_tokens=4, temperature=0.8, seed=7, n=2, logprobs=True, top_logprobs=2)
        request = ipb.ChatRequest(
            model=GEMMA, messages=[ipb.ChatMessage(role="user", content="Hi!")], params=params
        )
        chunks = list(stub.Chat(request, timeout=120))
        assert {c.index for c in chunks} == {0, 1}
        finishes = [c.index for c in chunks if c.finish_reason != ipb.FINISH_REASON_UNSPECIFIED]
        assert sorted(finishes) == [0, 1]
        assert chunks[-1].HasField("usage") and not any(c.HasField("usage") for c in chunks[:-1])
        entries = [e for c in chunks for e in c.logprobs]
        assert len(entries) == chunks[-1].usage.completion_tokens
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)

        plain = ipb.CompleteRequest(
            model=GEMMA, prompt=PROMPT, params=ipb.SamplingParams(max_tokens=4, temperature=0)
        )
        unasked = list(stub.Complete(plain, timeout=120))
        assert not any(c.logprobs for c in unasked) and {c.index for c in unasked} == {0}
