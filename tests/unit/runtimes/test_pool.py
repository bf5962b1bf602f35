"""ModelPool behaviour: load on first use, slots and queueing, LRU eviction past the budget, unload, cancel.

The engine here is a small real one written for the tests ("counter"): it streams the numbers 1..n, one
per step, at a fixed pace, and takes the memory its catalogue entry says. The pool cannot tell it from
llama.cpp; the real engines are exercised in tests/integration/test_runtime_*.py.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from common.errors import ErrorCode, LlmlbError
from common.inference import (
    AudioChunk,
    ChatMessage,
    ChatRequest,
    CompleteRequest,
    EmbedRequest,
    FinishReason,
    GeneratedImage,
    GenerateImageRequest,
    SamplingParams,
    SpeakRequest,
    TextChunk,
    TranscribeRequest,
    Transcript,
    Usage,
)
from common.types import Backend, Capability, FileFormat, ManifestFile, Model, ModelSource
from node.hardware import Hardware
from node.kinds import CHAT, EMBED, IMAGE, SPEAK, TRANSCRIBE
from node.pool import ModelPool, PoolSettings
from node.runtimes.base import CancelFlag, LoadContext, RuntimeSpec
from node.runtimes.engines import Engines

STEP_S = 0.02


class CounterRuntime:
    engine = "counter"
    capabilities = frozenset({Capability.CHAT, Capability.COMPLETION})

    def __init__(self, context: LoadContext) -> None:
        self.model = context.model
        self.path = next(iter(context.paths.values()))
        self.loaded = False
        self.running = 0

    @property
    def memory_mb(self) -> int:
        return self.model.required_vram_mb

    def load(self) -> None:
        time.sleep(0.05)
        if self.path.read_bytes() != b"counter":
            raise LlmlbError(ErrorCode.INTERNAL, f"{self.path.name} is not a counter model")
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def health(self) -> str | None:
        return None if self.loaded else "not loaded"

    def _count(self, n: int, cancel: CancelFlag) -> Iterator[TextChunk]:
        assert self.loaded, "called while not loaded"
        self.running += 1
        try:
            produced = 0
            for i in range(1, n + 1):
                if cancel.is_set():
                    yield TextChunk("", "", FinishReason.CANCELLED, Usage(1, produced))
                    return
                time.sleep(STEP_S)
                produced += 1
                yield TextChunk("", f"{i} ")
            yield TextChunk("", "", FinishReason.LENGTH, Usage(1, produced))
        finally:
            self.running -= 1

    def chat(self, request: ChatRequest, cancel: CancelFlag) -> Iterator[TextChunk]:
        return self._count(request.params.max_tokens or 5, cancel)

    def complete(self, request: CompleteRequest, cancel: CancelFlag) -> Iterator[TextChunk]:
        return self._count(request.params.max_tokens or 5, cancel)


@dataclass
class Resolved:
    model: Model
    paths: Mapping[str, Path] = field(default_factory=dict)


def counter_model(tmp_path: Path, model_id: str, memory_mb: int, content: bytes = b"counter") -> Resolved:
    path = tmp_path / f"{model_id}.count"
    path.write_bytes(content)
    model = Model(
        id=model_id,
        name=model_id,
        source=ModelSource.LOCAL,
        repo_id="",
        revision="",
        origin="",
        files=[ManifestFile(path.name, FileFormat.OTHER, len(content))],
        capabilities=[Capability.CHAT, Capability.COMPLETION],
        required_vram_mb=memory_mb,
    )
    return Resolved(model, {path.name: path})


COUNTER = RuntimeSpec("counter", frozenset({FileFormat.OTHER}), CounterRuntime.capabilities, CounterRuntime)
CPU = Hardware(backend=Backend.CPU, backends=(Backend.CPU,), cpu_count=2, memory_total_mb=8192)


def make_pool(**settings: int) -> ModelPool:
    return ModelPool(CPU, PoolSettings(**settings), Engines([COUNTER]))  # type: ignore[arg-type]


def chat(model: Resolved, n: int) -> ChatRequest:
    return ChatRequest(model.model.id, (ChatMessage("user", "count"),), SamplingParams(max_tokens=n))


async def collect(pool: ModelPool, model: Resolved, n: int = 3) -> list[TextChunk]:
    return [c async for c in pool.stream(CHAT, model, chat(model, n))]


async def wait_for(condition: object, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_first_request_loads_the_model_and_streams(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=1000)
    model = counter_model(tmp_path, "a", 100)
    assert pool.states() == {}
    chunks = await collect(pool, model, 3)
    assert "".join(c.delta for c in chunks) == "1 2 3 "
    assert chunks[-1].finish_reason is FinishReason.LENGTH and chunks[-1].usage == Usage(1, 3)
    assert {c.request_id for c in chunks} != {""} and len({c.request_id for c in chunks}) == 1
    assert {c.model for c in chunks} == {"a"}
    assert pool.states() == {"a": "ready"}
    await pool.close()


async def test_state_is_loading_while_the_model_loads(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=1000)
    model = counter_model(tmp_path, "a", 100)
    task = asyncio.create_task(collect(pool, model, 1))
    await wait_for(lambda: pool.states() == {"a": "loading"})
    await task
    assert pool.states() == {"a": "ready"}
    await pool.close()


async def test_a_failed_load_is_reported_with_its_reason_and_retried(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=1000)
    model = counter_model(tmp_path, "broken", 100, content=b"garbage")
    with pytest.raises(LlmlbError, match="not a counter model"):
        await collect(pool, model)
    assert pool.states() == {"broken": "failed"}
    assert "not a counter model" in pool.errors()["broken"]
    next(iter(model.paths.values())).write_bytes(b"counter")  # the operator fixes the file
    assert len(await collect(pool, model)) == 4
    assert pool.states() == {"broken": "ready"} and pool.errors() == {}
    await pool.close()


async def test_loading_past_the_budget_evicts_the_least_recently_used(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=250)
    a, b, c = (counter_model(tmp_path, name, 100) for name in "abc")
    await collect(pool, a)
    await collect(pool, b)
    await collect(pool, a)  # a is now more recent than b
    assert pool.states() == {"a": "ready", "b": "ready"}
    await collect(pool, c)
    assert pool.states() == {"a": "ready", "c": "ready"}
    assert pool.used_mb == 200 <= pool.budget_mb
    await pool.close()


async def test_a_busy_model_is_not_evicted_the_load_waits_for_it(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=150)
    a, b = counter_model(tmp_path, "a", 100), counter_model(tmp_path, "b", 100)
    long_a = asyncio.create_task(collect(pool, a, 20))
    await wait_for(lambda: pool.states().get("a") == "ready")
    started = time.monotonic()
    b_chunks = await collect(pool, b, 1)
    a_chunks = await long_a
    assert a_chunks[-1].usage == Usage(1, 20)  # a finished its answer untouched
    assert b_chunks[-1].finish_reason is FinishReason.LENGTH
    assert time.monotonic() - started >= 10 * STEP_S  # b waited for a to finish
    assert pool.states() == {"b": "ready"}
    await pool.close()


async def test_a_model_larger_than_the_budget_is_refused_clearly(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=100)
    with pytest.raises(LlmlbError) as caught:
        await collect(pool, counter_model(tmp_path, "huge", 500))
    assert "needs about 500 MB" in caught.value.message and "100 MB" in caught.value.message
    assert pool.states() == {"huge": "failed"}
    await pool.close()


async def test_requests_beyond_the_slots_queue_and_all_complete(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=1000, slots_per_model=2)
    model = counter_model(tmp_path, "a", 100)
    await collect(pool, model, 1)
    runtime = pool._entries[("a", "counter")].runtime
    assert isinstance(runtime, CounterRuntime)
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, runtime.running)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(collect(pool, model, 5) for _ in range(5)))
    watcher.cancel()
    assert all(r[-1].usage == Usage(1, 5) for r in results)
    assert most == 2
    await pool.close()


async def test_a_full_queue_answers_queue_full_with_retry_after(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=1000, slots_per_model=1, queue_per_model=1)
    model = counter_model(tmp_path, "a", 100)
    first = asyncio.create_task(collect(pool, model, 10))
    second = asyncio.create_task(collect(pool, model, 1))
    await wait_for(lambda: sum(s.active + s.waiting for s in pool.details()) == 2)
    with pytest.raises(LlmlbError) as caught:
        await collect(pool, model, 1)
    assert caught.value.code is ErrorCode.QUEUE_FULL and caught.value.retry_after_s
    await asyncio.gather(first, second)
    await pool.close()


async def test_a_consumer_that_goes_away_frees_its_slot_at_once(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=1000, slots_per_model=1)
    model = counter_model(tmp_path, "a", 100)
    stream = pool.stream(CHAT, model, chat(model, 1000))
    first = await anext(stream)
    assert first.delta == "1 "
    started = time.monotonic()
    await stream.aclose()
    freed_after = time.monotonic() - started
    [status] = pool.details()
    assert status.active == 0
    assert freed_after < 5 * STEP_S
    runtime = pool._entries[("a", "counter")].runtime
    assert isinstance(runtime, CounterRuntime) and runtime.running == 0
    assert (await collect(pool, model, 2))[-1].usage == Usage(1, 2)  # the slot serves the next request
    await pool.close()


async def test_a_cancelled_task_frees_its_slot(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=1000, slots_per_model=1)
    model = counter_model(tmp_path, "a", 100)
    task = asyncio.create_task(collect(pool, model, 1000))
    await wait_for(lambda: any(s.active for s in pool.details()))
    await asyncio.sleep(3 * STEP_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.details()[0].active == 0
    assert (await collect(pool, model, 1))[-1].finish_reason is FinishReason.LENGTH
    await pool.close()


async def test_unload_stops_streams_and_forgets_the_model(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=1000)
    model = counter_model(tmp_path, "a", 100)
    task = asyncio.create_task(collect(pool, model, 1000))
    await wait_for(lambda: any(s.active for s in pool.details()))
    runtime = pool._entries[("a", "counter")].runtime
    await pool.unload("a")
    chunks = await task
    assert chunks[-1].finish_reason is FinishReason.CANCELLED
    assert pool.states() == {} and pool.used_mb == 0
    assert isinstance(runtime, CounterRuntime) and not runtime.loaded
    await pool.close()


async def test_invalid_sampling_is_refused_before_anything_loads(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=1000)
    model = counter_model(tmp_path, "a", 100)
    bad = ChatRequest("a", (ChatMessage("user", "x"),), SamplingParams(temperature=3.0))
    with pytest.raises(LlmlbError) as caught:
        [c async for c in pool.stream(CHAT, model, bad)]
    assert caught.value.code is ErrorCode.INVALID_REQUEST and "temperature" in caught.value.message
    assert pool.states() == {}
    await pool.close()


async def test_blocking_work_stays_off_the_event_loop(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=1000)
    model = counter_model(tmp_path, "a", 100)
    ticks = 0
    stop = threading.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await collect(pool, model, 10)  # about 0.25 s of load + steps on worker threads
    stop.set()
    await task
    assert ticks >= 20
    await pool.close()


class GatedEmbedder(CounterRuntime):
    """Embeds only once ``release`` is set, as a long engine call the caller may abandon."""

    engine = "gated"
    capabilities = frozenset({Capability.EMBEDDING})

    def __init__(self, context: LoadContext) -> None:
        super().__init__(context)
        self.inside = threading.Event()
        self.release = threading.Event()

    def embed(self, request: EmbedRequest) -> tuple[list[list[float]], Usage]:
        self.inside.set()
        assert self.release.wait(10), "never released"
        assert self.loaded, "the engine was unloaded under a call still running"
        return [[1.0]], Usage(1, 0)


async def test_an_abandoned_engine_call_holds_its_slot_until_the_engine_lets_go(tmp_path: Path) -> None:
    gated = RuntimeSpec("gated", frozenset({FileFormat.OTHER}), GatedEmbedder.capabilities, GatedEmbedder)
    pool = ModelPool(CPU, PoolSettings(memory_budget_mb=1000, slots_per_model=1), Engines([gated]))  # type: ignore[list-item]
    model = counter_model(tmp_path, "e", 100)
    model.model.capabilities = [Capability.EMBEDDING]
    task = asyncio.create_task(pool.unary(EMBED, model, EmbedRequest("e", ("x",))))
    await wait_for(lambda: ("e", "gated") in pool._entries and pool._entries[("e", "gated")].active)
    entry = pool._entries[("e", "gated")]
    runtime = entry.runtime
    assert isinstance(runtime, GatedEmbedder)
    await asyncio.to_thread(runtime.inside.wait, 5)
    task.cancel()
    unloading = asyncio.create_task(pool.unload("e"))
    await asyncio.sleep(0.1)
    assert not task.done() and entry.active == 1  # still inside the engine: the slot is held
    assert not unloading.done() and runtime.loaded  # and nothing unloads the engine under it
    runtime.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await unloading
    assert not runtime.loaded and pool.states() == {}
    await pool.close()


async def test_a_copy_on_its_way_out_still_counts_against_the_budget(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=150)
    model = counter_model(tmp_path, "a", 100)
    stream = pool.stream(CHAT, model, chat(model, 1000))
    await anext(stream)  # the loaded copy is busy
    path = next(iter(model.paths.values()))
    seen = path.stat()
    os.utime(path, ns=(seen.st_atime_ns, seen.st_mtime_ns + 10**9))  # its file changed: load it again
    reload = asyncio.create_task(collect(pool, model, 2))
    await asyncio.sleep(0.2)
    # Both copies would need 200 MB of a 150 MB budget: the new one waits for the old one to go.
    assert not reload.done() and pool.used_mb == 100
    await stream.aclose()
    assert (await asyncio.wait_for(reload, 5))[-1].finish_reason is FinishReason.LENGTH
    assert pool.used_mb == 100
    await pool.close()


class ThreadNoting(CounterRuntime):
    """Notes the thread every engine call runs on."""

    threads: ClassVar[list[threading.Thread]] = []

    def load(self) -> None:
        self.threads.append(threading.current_thread())
        super().load()

    def _count(self, n: int, cancel: CancelFlag) -> Iterator[TextChunk]:
        self.threads.append(threading.current_thread())
        return super()._count(n, cancel)


async def test_engine_calls_run_on_threads_that_end_with_them(tmp_path: Path) -> None:
    # A thread that called llama.cpp keeps an OpenMP team alive as long as it lives; teams left on
    # long-lived threads slow every later generation once they outnumber the cores (node/threads.py).
    spec = RuntimeSpec("noting", frozenset({FileFormat.OTHER}), ThreadNoting.capabilities, ThreadNoting)
    pool = ModelPool(CPU, PoolSettings(memory_budget_mb=1000), Engines([spec]))
    model = counter_model(tmp_path, "a", 100)
    ThreadNoting.threads.clear()

    for _ in range(3):
        assert len(await collect(pool, model)) == 4
    await pool.close()

    noted = ThreadNoting.threads
    assert len(noted) == 4  # the load, then three generations
    assert len({id(t) for t in noted}) == 4
    for thread in noted:
        thread.join(timeout=5)
        assert not thread.is_alive(), f"{thread.name} outlived its call"


async def test_a_pinned_model_is_never_evicted_for_an_on_demand_load(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=250)
    a, b, c = (counter_model(tmp_path, name, 100) for name in "abc")
    await pool.prefetch(a, pin=True)  # a scheduled copy, the least recently used from here on
    await collect(pool, b)
    await collect(pool, c)  # room for c is made by evicting b, not the older a
    assert pool.states() == {"a": "ready", "c": "ready"}
    assert pool.pinned() == {"a"}
    assert pool.memory_by_model() == {"a": 100, "c": 100}
    assert [d.pinned for d in pool.details()] == [True, False]
    await pool.close()


async def test_an_on_demand_load_that_only_pinned_models_block_is_refused_clearly(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=150)
    a, b = counter_model(tmp_path, "a", 100), counter_model(tmp_path, "b", 100)
    await pool.prefetch(a, pin=True)
    with pytest.raises(LlmlbError) as caught:
        await asyncio.wait_for(collect(pool, b), 2.0)  # refused at once, not waiting forever
    assert caught.value.code is ErrorCode.INSUFFICIENT_STORAGE
    assert "100 MB of this node's 150 MB memory budget hold models the balancer keeps" in caught.value.message
    assert pool.states() == {"a": "ready", "b": "failed"}
    await pool.close()


async def test_unloading_a_pinned_model_ends_its_pin_and_frees_its_memory(tmp_path: Path) -> None:
    pool = make_pool(memory_budget_mb=150)
    a, b = counter_model(tmp_path, "a", 100), counter_model(tmp_path, "b", 100)
    await pool.prefetch(a, pin=True)
    await pool.unload("a")
    assert pool.pinned() == frozenset() and pool.states() == {}
    await collect(pool, b)
    assert pool.states() == {"b": "ready"}
    await pool.close()


class HungryRuntime(CounterRuntime):
    """Takes far more memory loading than its catalogue entry says (a wrong required_vram_mb)."""

    def load(self) -> None:
        super().load()
        self.ballast = b"x" * (160 * 1024 * 1024)  # written, so resident

    def unload(self) -> None:
        super().unload()
        del self.ballast


async def test_what_a_load_measurably_took_corrects_the_estimate(tmp_path: Path) -> None:
    hungry = RuntimeSpec("counter", frozenset({FileFormat.OTHER}), CounterRuntime.capabilities, HungryRuntime)
    pool = ModelPool(CPU, PoolSettings(memory_budget_mb=1000), Engines([hungry]))  # type: ignore[list-item]
    model = counter_model(tmp_path, "a", 10)
    await pool.prefetch(model)
    assert pool.memory_by_model()["a"] >= 150  # what it took, not the 10 MB it claimed
    assert [d.memory_mb for d in pool.details()] == [pool.memory_by_model()["a"]]
    await pool.close()


class EveryKindRuntime(CounterRuntime):
    """The counter, serving every other kind too: an input's embedding is its length, speech is one
    chunk per word at the counter's pace, a transcript tells the audio's size, an image is its seed."""

    engine = "every"
    capabilities = frozenset(Capability)

    def embed(self, request: EmbedRequest) -> tuple[list[list[float]], Usage]:
        return [[float(len(text))] for text in request.input], Usage(len(request.input), 0)

    def transcribe(self, request: TranscribeRequest, cancel: CancelFlag | None = None) -> Transcript:
        return Transcript(f"{len(request.audio)} bytes", "en", 1.0)

    def speak(self, request: SpeakRequest, cancel: CancelFlag) -> Iterator[AudioChunk]:
        self.running += 1
        try:
            words = request.input.split()
            for i, word in enumerate(words):
                if cancel.is_set():
                    yield AudioChunk(b"", 16000, last=True)
                    return
                time.sleep(STEP_S)
                yield AudioChunk(word.encode(), 16000, last=i == len(words) - 1)
        finally:
            self.running -= 1

    def generate_images(self, request: GenerateImageRequest) -> list[GeneratedImage]:
        return [GeneratedImage(b"png", seed) for seed in range(request.n)]


EVERY = RuntimeSpec("every", frozenset({FileFormat.OTHER}), EveryKindRuntime.capabilities, EveryKindRuntime)


def every_kind_model(tmp_path: Path, model_id: str = "every") -> Resolved:
    model = counter_model(tmp_path, model_id, 100)
    model.model.capabilities = list(Capability)
    return model


async def test_each_unary_kind_answers_from_the_runtime_with_the_models_id(tmp_path: Path) -> None:
    pool = ModelPool(CPU, PoolSettings(memory_budget_mb=1000), Engines([EVERY]))
    model = every_kind_model(tmp_path)

    embedded = await pool.unary(EMBED, model, EmbedRequest("every", ("ab", "abc")))
    assert (embedded.model, embedded.data, embedded.usage) == ("every", ((2.0,), (3.0,)), Usage(2, 0))
    transcript = await pool.unary(TRANSCRIBE, model, TranscribeRequest("every", b"\0" * 10))
    assert transcript.text == "10 bytes"
    images = await pool.unary(IMAGE, model, GenerateImageRequest("every", "a cat", n=2))
    assert [image.seed for image in images.images] == [0, 1]
    assert [d.active for d in pool.details()] == [0]  # every call gave its slot back
    await pool.close()


async def test_a_unary_call_waits_for_the_slot_a_stream_holds(tmp_path: Path) -> None:
    pool = ModelPool(CPU, PoolSettings(memory_budget_mb=1000, slots_per_model=1), Engines([EVERY]))
    model = every_kind_model(tmp_path)
    stream = pool.stream(CHAT, model, chat(model, 1000))
    await anext(stream)  # holds the only slot
    embedding = asyncio.create_task(pool.unary(EMBED, model, EmbedRequest("every", ("x",))))
    await wait_for(lambda: [(d.active, d.waiting) for d in pool.details()] == [(1, 1)])
    assert not embedding.done()
    await stream.aclose()
    assert (await asyncio.wait_for(embedding, 5)).data == ((1.0,),)
    await pool.close()


async def test_a_speech_stream_whose_consumer_goes_away_stops_and_frees_its_slot(tmp_path: Path) -> None:
    pool = ModelPool(CPU, PoolSettings(memory_budget_mb=1000, slots_per_model=1), Engines([EVERY]))
    model = every_kind_model(tmp_path)
    stream = pool.stream(SPEAK, model, SpeakRequest("every", " ".join(["word"] * 500)))
    assert (await anext(stream)).data == b"word"
    await stream.aclose()
    runtime = pool._entries[("every", "every")].runtime
    assert isinstance(runtime, EveryKindRuntime) and runtime.running == 0
    assert [d.active for d in pool.details()] == [0]
    chunks = [c async for c in pool.stream(SPEAK, model, SpeakRequest("every", "two words"))]
    assert [(c.data, c.last) for c in chunks] == [(b"two", False), (b"words", True)]
    await pool.close()


async def test_a_runtime_without_the_kinds_call_is_refused_and_its_slot_freed(tmp_path: Path) -> None:
    # An engine that claims embeddings but whose runtime cannot make them.
    claims = RuntimeSpec("counter", frozenset({FileFormat.OTHER}), frozenset(Capability), CounterRuntime)
    pool = ModelPool(CPU, PoolSettings(memory_budget_mb=1000), Engines([claims]))
    model = every_kind_model(tmp_path, "a")
    with pytest.raises(LlmlbError) as caught:
        await pool.unary(EMBED, model, EmbedRequest("a", ("x",)))
    assert caught.value.code is ErrorCode.NO_CAPABLE_NODES
    assert caught.value.message == "'a': runtime cannot serve embedding"
    assert [d.active for d in pool.details()] == [0]
    await pool.close()


async def test_an_invalid_unary_request_is_refused_before_anything_loads(tmp_path: Path) -> None:
    pool = ModelPool(CPU, PoolSettings(memory_budget_mb=1000), Engines([EVERY]))
    with pytest.raises(LlmlbError) as caught:
        await pool.unary(IMAGE, every_kind_model(tmp_path), GenerateImageRequest("every", "a cat", n=11))
    assert caught.value.code is ErrorCode.INVALID_REQUEST and "n must be" in caught.value.message
    assert pool.states() == {}
    await pool.close()
