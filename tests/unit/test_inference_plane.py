"""The inference plane records each request once, however its door consumes the answer: a stream read
to its end, closed early by a caller that went away, failing midway, or refused by the door after it
was handed out. No sockets: the kinds here answer from in-memory generators, through the real
admission, observer and sinks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import pytest

from balancer.edge.labels import Labels
from balancer.edge.observe import ObservedCall
from balancer.edge.plane import Door, InferencePlane, Kind
from balancer.router import Router
from common.errors import ErrorCode, LlmlbError
from common.inference import ChatMessage, ChatRequest, TextChunk, Usage
from common.metrics import BalancerMetrics

MODEL = "gemma-3-270m"
REQUEST = ChatRequest(MODEL, (ChatMessage("user", "Hi"),))


@dataclass
class Finished:
    code: str
    prompt_tokens: int
    completion_tokens: int
    first_token: bool


@dataclass
class Recorder:
    """A sink: what each finished request was counted as."""

    seen: list[Finished] = field(default_factory=list)

    def finished(self, call: ObservedCall, code: str, elapsed_s: float) -> None:
        self.seen.append(
            Finished(code, call.prompt_tokens, call.completion_tokens, call.first_token_s is not None)
        )


class Known:
    def knows(self, model_id: str) -> bool:
        return model_id == MODEL

    def info(self, node_id: str) -> object | None:
        return None


@dataclass
class Answer:
    """A node's streamed answer: its chunks, an error after ``fail_after`` of them, and whether the work
    behind it was stopped (its generator closed)."""

    chunks: tuple[TextChunk, ...]
    fail_after: int | None = None
    stopped: bool = False

    async def stream(self) -> AsyncIterator[TextChunk]:
        try:
            for sent, chunk in enumerate(self.chunks):
                if sent == self.fail_after:
                    raise LlmlbError(ErrorCode.UNAVAILABLE, "the node went away")
                yield chunk
        finally:
            self.stopped = True


def chunks() -> tuple[TextChunk, ...]:
    return (TextChunk("r", "Hel"), TextChunk("r", "lo", usage=Usage(prompt_tokens=3, completion_tokens=2)))


def plane_for(answer: Answer) -> tuple[InferencePlane, Kind[ChatRequest, TextChunk], Recorder]:
    recorder = Recorder()
    plane = InferencePlane(
        cast(Router, None), BalancerMetrics(lambda: {}), Labels(Known(), Known()), sinks=(recorder,)
    )
    return plane, Kind("chat", stream=lambda router, request, timeout: answer.stream()), recorder


async def test_a_stream_read_to_its_end_counts_its_first_token_tokens_and_ok_once() -> None:
    answer = Answer(chunks())
    plane, kind, recorder = plane_for(answer)
    async with plane.open(kind, Door("http")) as exchange:
        stream = await exchange.stream(REQUEST)
        assert stream.first is not None and stream.first.delta == "Hel"
    assert recorder.seen == []  # the stream, not the door's handler, ends the request
    assert [chunk.delta async for chunk in stream] == ["Hel", "lo"]
    assert recorder.seen == [Finished("ok", 3, 2, True)]


async def test_a_stream_its_caller_abandons_is_cancelled_and_stops_the_work_behind_it() -> None:
    answer = Answer(chunks())
    plane, kind, recorder = plane_for(answer)
    items = plane.stream(kind, Door("grpc"), lambda request: request, REQUEST)
    assert (await anext(items)).delta == "Hel"
    await items.aclose()
    assert recorder.seen == [Finished(ErrorCode.CANCELLED.value, 0, 0, True)]
    assert answer.stopped


async def test_an_error_midway_is_the_streams_outcome_and_reaches_the_door() -> None:
    answer = Answer(chunks(), fail_after=1)
    plane, kind, recorder = plane_for(answer)
    async with plane.open(kind, Door("http")) as exchange:
        stream = await exchange.stream(REQUEST)
    with pytest.raises(LlmlbError) as raised:
        [chunk async for chunk in stream]
    assert raised.value.code is ErrorCode.UNAVAILABLE
    await stream.aclose()  # the door closes what it consumed: nothing more is counted
    assert recorder.seen == [Finished(ErrorCode.UNAVAILABLE.value, 0, 0, True)]


async def test_a_door_refusing_a_stream_it_was_handed_records_its_error_and_stops_the_work() -> None:
    answer = Answer(chunks())
    plane, kind, recorder = plane_for(answer)
    with pytest.raises(LlmlbError):
        async with plane.open(kind, Door("http")) as exchange:
            await exchange.stream(REQUEST)
            raise LlmlbError(ErrorCode.INTERNAL, "the node returned no audio")
    assert recorder.seen == [Finished(ErrorCode.INTERNAL.value, 0, 0, True)]
    assert answer.stopped


async def test_a_request_the_door_cannot_parse_is_counted_once_under_its_route() -> None:
    plane, kind, recorder = plane_for(Answer(chunks()))
    with pytest.raises(LlmlbError):
        async with plane.open(kind, Door("http")):
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "broken JSON")
    assert recorder.seen == [Finished(ErrorCode.INVALID_REQUEST.value, 0, 0, False)]


async def test_a_caller_cancelled_before_the_first_item_is_counted_cancelled_and_the_work_stopped() -> None:
    started = asyncio.Event()

    async def slow() -> AsyncIterator[TextChunk]:
        started.set()
        await asyncio.Event().wait()
        yield TextChunk("r", "never")

    recorder = Recorder()
    plane = InferencePlane(
        cast(Router, None), BalancerMetrics(lambda: {}), Labels(Known(), Known()), sinks=(recorder,)
    )
    kind: Kind[ChatRequest, TextChunk] = Kind("chat", stream=lambda router, request, timeout: slow())

    async def consume() -> None:
        async for _ in plane.stream(kind, Door("grpc"), lambda request: request, REQUEST):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert recorder.seen == [Finished(ErrorCode.CANCELLED.value, 0, 0, False)]
