"""The inference plane records each request once, however its door consumes the answer: a stream read
to its end, closed early by a caller that went away, failing midway, or refused by the door after it
was handed out. No sockets: the kinds here answer from in-memory generators, through the real
admission, observer and sinks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest

from balancer.edge.labels import Labels
from balancer.edge.observe import ObservedCall
from balancer.edge.plane import Answer as PlaneAnswer
from balancer.edge.plane import Asked, Door, InferencePlane, Kind, Stream
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
    kind: Kind[ChatRequest, TextChunk] = Kind(
        "chat",
        stream=lambda router, request, timeout: answer.stream(),
        whole=lambda router, request, timeout: whole(answer),
    )
    return plane, kind, recorder


async def whole(answer: Answer) -> list[TextChunk]:
    return [chunk async for chunk in answer.stream()]


def asked(stream: bool) -> Callable[[], Awaitable[Asked[ChatRequest, None]]]:
    async def parse() -> Asked[ChatRequest, None]:
        return Asked(REQUEST, stream, None)

    return parse


def the_stream(answer: PlaneAnswer[ChatRequest, TextChunk, None]) -> Stream[TextChunk]:
    assert answer.stream is not None
    return answer.stream


async def test_a_stream_read_to_its_end_counts_its_first_token_tokens_and_ok_once() -> None:
    answer = Answer(chunks())
    plane, kind, recorder = plane_for(answer)
    stream = await plane.answer(kind, Door("http"), asked(True), the_stream)
    assert stream.first is not None and stream.first.delta == "Hel"
    assert recorder.seen == []  # the stream, not the door's handler, ends the request
    assert [chunk.delta async for chunk in stream] == ["Hel", "lo"]
    assert recorder.seen == [Finished("ok", 3, 2, True)]


async def test_a_whole_answer_is_handed_to_the_encoder_and_counted_once() -> None:
    plane, kind, recorder = plane_for(Answer(chunks()))

    def encode(answer: PlaneAnswer[ChatRequest, TextChunk, None]) -> str:
        assert answer.stream is None and answer.model == MODEL and answer.request_id
        return "".join(chunk.delta for chunk in answer.items)

    assert await plane.answer(kind, Door("http"), asked(False), encode) == "Hello"
    assert recorder.seen == [Finished("ok", 3, 2, False)]


async def test_a_stream_its_caller_abandons_is_cancelled_and_stops_the_work_behind_it() -> None:
    answer = Answer(chunks())
    plane, kind, recorder = plane_for(answer)
    stream = await plane.answer(kind, Door("grpc"), asked(True), the_stream)
    items = aiter(stream)
    assert (await anext(items)).delta == "Hel"
    await stream.aclose()
    assert recorder.seen == [Finished(ErrorCode.CANCELLED.value, 0, 0, True)]
    assert answer.stopped


async def test_an_error_midway_is_the_streams_outcome_and_reaches_the_door() -> None:
    answer = Answer(chunks(), fail_after=1)
    plane, kind, recorder = plane_for(answer)
    stream = await plane.answer(kind, Door("http"), asked(True), the_stream)
    with pytest.raises(LlmlbError) as raised:
        [chunk async for chunk in stream]
    assert raised.value.code is ErrorCode.UNAVAILABLE
    await stream.aclose()  # the door closes what it consumed: nothing more is counted
    assert recorder.seen == [Finished(ErrorCode.UNAVAILABLE.value, 0, 0, True)]


async def test_a_door_refusing_a_stream_it_was_handed_records_its_error_and_stops_the_work() -> None:
    answer = Answer(chunks())
    plane, kind, recorder = plane_for(answer)

    def refuse(answer: PlaneAnswer[ChatRequest, TextChunk, None]) -> None:
        raise LlmlbError(ErrorCode.INTERNAL, "the node returned no audio")

    with pytest.raises(LlmlbError):
        await plane.answer(kind, Door("http"), asked(True), refuse)
    assert recorder.seen == [Finished(ErrorCode.INTERNAL.value, 0, 0, True)]
    assert answer.stopped


async def test_a_request_the_door_cannot_parse_is_counted_once_under_its_route() -> None:
    plane, kind, recorder = plane_for(Answer(chunks()))

    async def broken() -> Asked[ChatRequest, None]:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, "broken JSON")

    with pytest.raises(LlmlbError):
        await plane.answer(kind, Door("http"), broken, the_stream)
    assert recorder.seen == [Finished(ErrorCode.INVALID_REQUEST.value, 0, 0, False)]


async def test_a_refusal_at_admission_is_counted_once_and_never_reaches_the_router() -> None:
    plane, kind, recorder = plane_for(Answer(chunks()))

    async def unnamed() -> Asked[ChatRequest, None]:
        return Asked(ChatRequest("", REQUEST.messages), False, None)

    with pytest.raises(LlmlbError) as raised:
        await plane.answer(kind, Door("grpc"), unnamed, the_stream)
    assert raised.value.code is ErrorCode.INVALID_REQUEST
    assert recorder.seen == [Finished(ErrorCode.INVALID_REQUEST.value, 0, 0, False)]


async def test_a_caller_cancelled_before_the_first_item_is_counted_cancelled_and_the_work_stopped() -> None:
    started = asyncio.Event()
    stopped = asyncio.Event()

    async def slow() -> AsyncIterator[TextChunk]:
        started.set()
        try:
            await asyncio.Event().wait()
            yield TextChunk("r", "never")
        finally:
            stopped.set()

    recorder = Recorder()
    plane = InferencePlane(
        cast(Router, None), BalancerMetrics(lambda: {}), Labels(Known(), Known()), sinks=(recorder,)
    )
    kind: Kind[ChatRequest, TextChunk] = Kind("chat", stream=lambda router, request, timeout: slow())
    task = asyncio.ensure_future(plane.answer(kind, Door("grpc"), asked(True), the_stream))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert recorder.seen == [Finished(ErrorCode.CANCELLED.value, 0, 0, False)]
    assert stopped.is_set()
