"""gemma-3-270m (GGUF) through the llama.cpp runtime: chat, completion, embeddings, sampling controls."""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

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
)
from devkit.model_files import ModelFiles
from node.runtimes.base import LoadContext, RuntimeSettings
from node.runtimes.llama import LlamaRuntime, StopMatcher

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def text(chunks: list[TextChunk]) -> str:
    return "".join(c.delta for c in chunks)


def chat(runtime: LlamaRuntime, content: str, params: SamplingParams = GREEDY) -> list[TextChunk]:
    request = ChatRequest("gemma-3-270m", (ChatMessage("user", content),), params)
    return list(runtime.chat(request, threading.Event()))


def complete(runtime: LlamaRuntime, prompt: str, params: SamplingParams = GREEDY) -> list[TextChunk]:
    return list(runtime.complete(CompleteRequest("gemma-3-270m", prompt, params), threading.Event()))


def test_chat_streams_tokens_with_usage_and_finish_reason(gemma_runtime: LlamaRuntime) -> None:
    chunks = chat(gemma_runtime, "Name three colours.")
    assert len([c for c in chunks if c.delta]) >= 3  # streamed piece by piece, not in one block
    assert text(chunks).strip()
    last = chunks[-1]
    assert last.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert last.usage is not None and 0 < last.usage.completion_tokens <= 8
    assert last.usage.prompt_tokens > 10  # the chat template's turn markers are counted
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_gguf_without_a_template_uses_the_catalogue_template(gemma_runtime: LlamaRuntime) -> None:
    assert "<start_of_turn>" in gemma_runtime.chat_template()


def test_chat_without_any_template_is_a_clear_error(gemma: ModelFiles) -> None:
    model = dataclasses.replace(gemma.model, chat_template="")
    runtime = LlamaRuntime(LoadContext(model, gemma.paths, RuntimeSettings(context_tokens=512)))
    runtime.load()
    try:
        with pytest.raises(LlmlbError) as caught:
            chat(runtime, "hi")
        assert caught.value.code is ErrorCode.INVALID_REQUEST
        assert "no chat template" in caught.value.message
        assert complete(runtime, "Hello")[-1].usage is not None  # completions still work
    finally:
        runtime.unload()


def test_max_tokens_ends_with_length(gemma_runtime: LlamaRuntime) -> None:
    chunks = complete(gemma_runtime, "Once upon a time", SamplingParams(max_tokens=5, temperature=0.0))
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_completion_continues_the_prompt(gemma_runtime: LlamaRuntime) -> None:
    out = text(
        complete(gemma_runtime, "One, two, three, four,", SamplingParams(max_tokens=6, temperature=0.0))
    )
    assert "five" in out.lower()


def test_stop_sequence_ends_the_answer_without_it(gemma_runtime: LlamaRuntime) -> None:
    params = SamplingParams(max_tokens=20, temperature=0.0, stop=("six",))
    chunks = complete(gemma_runtime, "One, two, three, four,", params)
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert "five" in text(chunks) and "six" not in text(chunks)


def test_echo_puts_the_prompt_first(gemma_runtime: LlamaRuntime) -> None:
    request = CompleteRequest("gemma-3-270m", "One, two,", GREEDY, echo=True)
    assert text(list(gemma_runtime.complete(request, threading.Event()))).startswith("One, two,")


def test_same_seed_same_output_and_sampling_varies(gemma_runtime: LlamaRuntime) -> None:
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    first = text(complete(gemma_runtime, "My favourite food is", seeded))
    assert text(complete(gemma_runtime, "My favourite food is", seeded)) == first
    others = {
        text(complete(gemma_runtime, "My favourite food is", dataclasses.replace(seeded, seed=s)))
        for s in range(4)
    }
    assert len(others | {first}) > 1


def test_top_p_and_temperature_reach_the_sampler(gemma_runtime: LlamaRuntime) -> None:
    prompt = "My favourite food is"
    greedy = text(complete(gemma_runtime, prompt, SamplingParams(max_tokens=12, temperature=0.0)))
    hot = SamplingParams(max_tokens=12, temperature=1.5)
    varied = {text(complete(gemma_runtime, prompt, dataclasses.replace(hot, seed=s))) for s in range(4)}
    assert len(varied) > 1  # at this temperature, sampling really varies with the seed ...
    narrow = dataclasses.replace(hot, top_p=1e-6)
    kept = {text(complete(gemma_runtime, prompt, dataclasses.replace(narrow, seed=s))) for s in range(4)}
    assert kept == {greedy}  # ... until top_p leaves only the likeliest token at each step


def test_cancel_flag_stops_generation_at_the_next_token(gemma_runtime: LlamaRuntime) -> None:
    cancel = threading.Event()
    request = CompleteRequest(
        "gemma-3-270m", "Count: 1, 2, 3,", SamplingParams(max_tokens=200, temperature=0.0)
    )
    chunks = []
    for chunk in gemma_runtime.complete(request, cancel):
        chunks.append(chunk)
        if len(chunks) == 3:
            cancel.set()
    assert chunks[-1].finish_reason is FinishReason.CANCELLED
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4


def test_a_prompt_longer_than_the_context_is_invalid(gemma: ModelFiles) -> None:
    runtime = LlamaRuntime(LoadContext(gemma.model, gemma.paths, RuntimeSettings(context_tokens=256)))
    runtime.load()
    try:
        with pytest.raises(LlmlbError) as caught:
            complete(runtime, "word " * 400)
        assert caught.value.code is ErrorCode.INVALID_REQUEST and "context window" in caught.value.message
    finally:
        runtime.unload()


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embeddings_are_unit_vectors_and_similar_texts_are_closer(gemma_runtime: LlamaRuntime) -> None:
    texts = ("The cat sat on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today.")
    vectors, usage = gemma_runtime.embed(EmbedRequest("gemma-3-270m", texts))
    assert len(vectors) == 3 and {len(v) for v in vectors} == {640}
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4) for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert usage.prompt_tokens > 10 and usage.completion_tokens == 0


def test_embedding_dimensions_truncate_and_renormalise(gemma_runtime: LlamaRuntime) -> None:
    vectors, _ = gemma_runtime.embed(EmbedRequest("gemma-3-270m", ("hello",), dimensions=64))
    assert len(vectors[0]) == 64
    assert math.isclose(math.sqrt(sum(x * x for x in vectors[0])), 1.0, rel_tol=1e-4)


def test_an_input_longer_than_one_embedding_batch_is_refused_not_cut_short(
    gemma_runtime: LlamaRuntime,
) -> None:
    fits = "word " * 300
    vectors, usage = gemma_runtime.embed(EmbedRequest("gemma-3-270m", (fits,)))
    assert len(vectors) == 1 and usage.prompt_tokens > 300
    with pytest.raises(LlmlbError) as caught:
        gemma_runtime.embed(EmbedRequest("gemma-3-270m", (fits, "word " * 800)))
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert "input 1 is" in caught.value.message and "at most 512 tokens" in caught.value.message


def test_memory_estimate_covers_the_weights(gemma_runtime: LlamaRuntime, gemma: ModelFiles) -> None:
    weights_mb = next(iter(gemma.paths.values())).stat().st_size / 2**20
    assert weights_mb < gemma_runtime.memory_mb < weights_mb + 1024


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "stopped"),
    [
        (["Hel", "lo ST", "OP more"], ("STOP",), "Hello ", True),
        (["a S", "T", "x"], ("STOP",), "a STx", False),
        (["abc"], (), "abc", False),
        (["x</", "s>"], ("</s>", "\n\n"), "x", True),
    ],
)
def test_stop_matcher_holds_back_partial_matches(
    pieces: list[str], stops: tuple[str, ...], expected: str, stopped: bool, tmp_path: Path
) -> None:
    matcher, out, hit = StopMatcher(stops), "", False
    for piece in pieces:
        emitted, hit = matcher.feed(piece)
        out += emitted
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (expected, stopped)
