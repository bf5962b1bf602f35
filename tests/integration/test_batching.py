"""Continuous batching with the real gemma-3-270m: streams interleave, answers stay exact, sequences free.

Streams are interleaved deterministically: each request's generator is started, then all are read one
chunk at a time in turn, so every request is in flight at once without threads or timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from common.inference import (
    CompleteRequest,
    FinishReason,
    ResponseFormat,
    ResponseFormatType,
    SamplingParams,
    TextChunk,
)
from common.types import Backend
from devkit.model_files import ModelFiles
from node.hardware import Hardware
from node.kinds import COMPLETE
from node.pool import ModelPool, PoolSettings
from node.runtimes.base import LoadContext, RuntimeSettings
from node.runtimes.llama import LlamaRuntime

pytestmark = pytest.mark.slow
CPU = Hardware(backend=Backend.CPU, backends=(Backend.CPU,), cpu_count=2, memory_total_mb=16384)
JSON = ResponseFormat(ResponseFormatType.JSON_OBJECT)
# Different prompts, lengths (one over several blocks), sampling and a grammar, all in one batch.
REQUESTS = [
    ("The capital of France is", SamplingParams(max_tokens=8, temperature=0.0)),
    (
        "Once upon a time, in a land far away, there lived " * 6,
        SamplingParams(max_tokens=8, temperature=0.0),
    ),
    ("A JSON object describing a cat:", SamplingParams(max_tokens=8, temperature=0.0, response_format=JSON)),
    ("def fibonacci(n):\n", SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7)),
]


def loaded(gemma: ModelFiles, **settings: object) -> Iterator[LlamaRuntime]:
    runtime = LlamaRuntime(LoadContext(gemma.model, gemma.paths, RuntimeSettings(threads=2, **settings)))  # type: ignore[arg-type]
    runtime.load()
    yield runtime
    runtime.unload()


@pytest.fixture(scope="module")
def exact(gemma: ModelFiles) -> Iterator[LlamaRuntime]:
    yield from loaded(gemma, slots=4, batch_exact=True, prefix_cache_mb=0)


def stream(
    runtime: LlamaRuntime, prompt: str, params: SamplingParams, cancel: threading.Event
) -> Iterator[TextChunk]:
    return iter(runtime.complete(CompleteRequest("gemma-3-270m", prompt, params), cancel))


def interleaved(streams: list[Iterator[TextChunk]]) -> tuple[list[list[TextChunk]], int]:
    """Reads the streams one chunk each in turn; also how many were in flight at the widest point."""
    out: list[list[TextChunk]] = [[] for _ in streams]
    live = set(range(len(streams)))
    widest = 0
    for i in range(len(streams)):
        out[i].append(next(streams[i]))  # starts each request before any is read further
    while live:
        widest = max(widest, len(live))
        for i in sorted(live):
            try:
                out[i].append(next(streams[i]))
            except StopIteration:
                live.discard(i)
    return out, widest


def text(chunks: list[TextChunk]) -> str:
    return "".join(c.delta for c in chunks)


def test_interleaved_streams_give_the_answers_each_gives_alone(exact: LlamaRuntime) -> None:
    alone = [text(list(stream(exact, p, params, threading.Event()))) for p, params in REQUESTS]
    together, widest = interleaved([stream(exact, p, params, threading.Event()) for p, params in REQUESTS])
    assert widest == len(REQUESTS)  # all four were generating at once
    assert [text(chunks) for chunks in together] == alone
    for chunks in together:
        assert chunks[-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


GREEDY = [
    ("The capital of France is", SamplingParams(max_tokens=16, temperature=0.0)),
    ("def fibonacci(n):\n", SamplingParams(max_tokens=16, temperature=0.0)),
    (
        "Once upon a time, in a land far away, there lived " * 6,
        SamplingParams(max_tokens=16, temperature=0.0),
    ),
    (
        "A list of colours: red,",
        SamplingParams(max_tokens=16, temperature=0.0, logprobs=True, top_logprobs=2),
    ),
]


def test_a_greedy_request_alone_gets_the_answer_and_logprobs_of_the_engine_before_batching(
    gemma: ModelFiles,
) -> None:
    # The batched engine picks a greedy token as the row's argmax, not through llama.cpp's sampler chain.
    def answers(**settings: object) -> list[tuple[str, list[tuple[str, float, tuple[str, ...]]]]]:
        runtime = next(loaded(gemma, prefix_cache_mb=0, **settings))
        try:
            out = []
            for prompt, params in GREEDY:
                chunks = list(stream(runtime, prompt, params, threading.Event()))
                probs = [
                    (p.token, p.logprob, tuple(t.token for t in p.top_logprobs))
                    for c in chunks
                    for p in c.logprobs
                ]
                out.append((text(chunks), probs))
            return out
        finally:
            runtime.unload()

    batched = answers(slots=4)
    before = answers(slots=1, batching=False)
    assert [t for t, _ in batched] == [t for t, _ in before]
    assert all(len(t) > 10 for t, _ in batched)
    got, want = batched[-1][1], before[-1][1]
    assert len(got) == 16 and [(i, top) for i, _, top in got] == [(i, top) for i, _, top in want]
    assert [lp for _, lp, _ in got] == pytest.approx([lp for _, lp, _ in want], abs=1e-4)


def test_a_cancelled_stream_frees_its_sequence_for_the_next_request(gemma: ModelFiles) -> None:
    runtime = next(loaded(gemma, slots=1, prefix_cache_mb=0))
    try:
        cancel = threading.Event()
        long = stream(
            runtime, "Count slowly: one, two,", SamplingParams(max_tokens=500, temperature=0.0), cancel
        )
        first = next(long)
        assert first.finish_reason is None
        cancel.set()
        rest = list(long)
        assert rest[-1].finish_reason is FinishReason.CANCELLED
        # The model has one sequence: the next request runs only because the cancelled one gave it back.
        done: list[TextChunk] = []
        worker = threading.Thread(
            target=lambda: done.extend(
                stream(runtime, "Hello", SamplingParams(max_tokens=4, temperature=0.0), threading.Event())
            )
        )
        worker.start()
        worker.join(timeout=60)
        assert done and done[-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    finally:
        runtime.unload()


def test_n_choices_share_one_evaluation_of_the_prompt(exact: LlamaRuntime) -> None:
    prompt = "The lighthouse keeper climbed the stairs every evening to light the lamp. " * 8
    singles = [
        list(
            stream(
                exact, prompt, SamplingParams(max_tokens=10, temperature=0.9, seed=11 + i), threading.Event()
            )
        )
        for i in range(3)
    ]
    before = exact.prompt_tokens_evaluated
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=11, n=3)
    chunks = list(stream(exact, prompt, params, threading.Event()))
    evaluated = exact.prompt_tokens_evaluated - before
    assert [text([c for c in chunks if c.index == i]) for i in range(3)] == [text(s) for s in singles]
    assert [c.index for c in chunks] == sorted(c.index for c in chunks)  # choice after choice
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 64
    assert usage.completion_tokens == sum(s[-1].usage.completion_tokens for s in singles if s[-1].usage)
    # The prompt went through the model once for all three choices: idle sequences took copies of it.
    assert evaluated == usage.prompt_tokens - usage.cached_tokens


async def test_a_node_runs_as_many_streams_at_once_as_its_slots_by_default(gemma: ModelFiles) -> None:
    pool = ModelPool(CPU, PoolSettings(engine_threads=2, prefix_cache_mb=0))
    try:
        started = asyncio.Event()
        firsts: list[int] = []

        async def one(i: int) -> None:
            request = CompleteRequest(
                "gemma-3-270m", f"Story {i}: once upon a time", SamplingParams(max_tokens=8, temperature=0.0)
            )
            async for _chunk in pool.stream(COMPLETE, gemma, request):
                if i not in firsts:
                    firsts.append(i)
                    if len(firsts) == 4:
                        started.set()
                    await started.wait()  # a stream holds on until every stream has begun

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), timeout=120)
        assert sorted(firsts) == [0, 1, 2, 3]
    finally:
        await pool.close()
