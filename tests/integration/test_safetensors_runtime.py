"""A real safetensors checkpoint served by the transformers runtime: the packaged gemma GGUF converted
once to safetensors (``devkit.safetensors_copy``), loaded with plain ``from_pretrained``.

Answers are a few tokens: float32 PyTorch on two shared cores makes about one to ten tokens a second.
"""

from __future__ import annotations

import math
import threading
import time

import pytest

from common.errors import ErrorCode, LlmlbError
from common.inference import (
    ChatMessage,
    ChatRequest,
    CompleteRequest,
    EmbedRequest,
    FinishReason,
    SamplingParams,
    TextChunk,
    Tool,
)
from node.runtimes.llama import LlamaRuntime
from node.runtimes.transformers import TransformersRuntime

pytestmark = pytest.mark.slow
PROMPT = "One, two, three, four,"


def complete(
    runtime: TransformersRuntime | LlamaRuntime, prompt: str = PROMPT, **params: object
) -> list[TextChunk]:
    request = CompleteRequest(model="m", prompt=prompt, params=SamplingParams(**params))  # type: ignore[arg-type]
    return list(runtime.complete(request, threading.Event()))


def text(chunks: list[TextChunk]) -> str:
    return "".join(c.delta for c in chunks)


def test_a_greedy_completion_streams_counts_its_tokens_and_repeats(gemma_safetensors_runtime) -> None:
    first = complete(gemma_safetensors_runtime, max_tokens=6, temperature=0)
    again = complete(gemma_safetensors_runtime, max_tokens=6, temperature=0)
    assert text(first) == text(again)
    assert text(first).strip().startswith("five")
    assert len([c for c in first if c.delta]) >= 3  # streamed piece by piece, not whole at the end
    last = first[-1]
    assert last.finish_reason is FinishReason.LENGTH and last.usage is not None
    assert (last.usage.completion_tokens, last.usage.prompt_tokens) == (6, 9)  # <bos> and 8 pieces


def test_a_stop_sequence_ends_the_answer_before_it(gemma_safetensors_runtime) -> None:
    chunks = complete(gemma_safetensors_runtime, max_tokens=8, temperature=0, stop=(" six",))
    assert text(chunks).strip() == "five,"
    assert chunks[-1].finish_reason is FinishReason.STOP


def test_a_seed_makes_sampling_repeat(gemma_safetensors_runtime) -> None:
    a = complete(gemma_safetensors_runtime, "My favourite animal is", max_tokens=4, temperature=1.0, seed=7)
    b = complete(gemma_safetensors_runtime, "My favourite animal is", max_tokens=4, temperature=1.0, seed=7)
    assert text(a) == text(b)


def test_a_cancelled_generation_stops_at_the_next_token(gemma_safetensors_runtime) -> None:
    cancel = threading.Event()
    request = CompleteRequest(model="m", prompt=PROMPT, params=SamplingParams(max_tokens=200, temperature=0))
    chunks = []
    started = time.monotonic()
    for chunk in gemma_safetensors_runtime.complete(request, cancel):
        chunks.append(chunk)
        cancel.set()  # the caller went away after the first piece
    assert chunks[-1].finish_reason is FinishReason.CANCELLED
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 2
    assert time.monotonic() - started < 60  # not the 200 tokens asked for


def test_chat_uses_the_catalogue_template_and_counts_the_rendered_prompt(gemma_safetensors_runtime) -> None:
    request = ChatRequest(
        model="m",
        messages=(ChatMessage("user", "Say hi."),),
        params=SamplingParams(max_tokens=3, temperature=0),
    )
    chunks = list(gemma_safetensors_runtime.chat(request, threading.Event()))
    usage = chunks[-1].usage
    # <bos><start_of_turn>user\nSay hi.<end_of_turn>\n<start_of_turn>model\n, one <bos> only
    assert usage is not None and usage.prompt_tokens == len(gemma_safetensors_runtime.render_chat(request))
    assert gemma_safetensors_runtime.render_chat(request).count(2) == 1
    assert 1 <= usage.completion_tokens <= 3


def test_requests_it_cannot_serve_are_the_callers_errors(gemma_safetensors_runtime) -> None:
    long_prompt = "word " * (gemma_safetensors_runtime.context_tokens() + 10)
    with pytest.raises(LlmlbError) as caught:
        complete(gemma_safetensors_runtime, long_prompt, max_tokens=1)
    assert caught.value.code is ErrorCode.INVALID_REQUEST and "context window" in caught.value.message
    tools = ChatRequest(model="m", messages=(ChatMessage("user", "hi"),), tools=(Tool("lookup"),))
    with pytest.raises(LlmlbError) as caught:
        list(gemma_safetensors_runtime.chat(tools, threading.Event()))
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_embeddings_are_unit_vectors_and_closer_for_closer_texts(gemma_safetensors_runtime) -> None:
    request = EmbedRequest(model="m", input=("a small cat", "a little kitten", "quarterly tax filing"))
    vectors, usage = gemma_safetensors_runtime.embed(request)
    assert usage.prompt_tokens > 0 and len(vectors) == 3
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])


def test_the_safetensors_copy_answers_as_the_gguf_does(gemma_safetensors_runtime, gemma_runtime) -> None:
    """Greedy answers of the two copies of one model: transformers (float32, dequantised) and llama.cpp
    (Q4_K_M). Quantisation may tip a close choice late in an answer, so most of it must agree."""
    prompts = ["The capital of France is", "def add(a, b):\n    return", "Water boils at"]
    agreed = total = 0
    for prompt in prompts:
        ours = text(complete(gemma_safetensors_runtime, prompt, max_tokens=8, temperature=0))
        theirs = text(complete(gemma_runtime, prompt, max_tokens=8, temperature=0))
        common = 0
        for a, b in zip(ours, theirs, strict=False):
            if a != b:
                break
            common += 1
        agreed += common
        total += max(len(ours), len(theirs))
        print(f"{prompt!r}: transformers {ours!r} llama.cpp {theirs!r} common {common}")
    print(f"common prefix: {agreed}/{total} characters")
    assert agreed / total >= 0.5
