"""Routing through the balancer's gRPC Inference door, to echo nodes that speak the real node protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from balancer.router import FIRST_LATENCY_S
from balancer.server import Balancer, start
from common.channels import bearer_metadata
from common.config import load_balancer_config
from common.errors import ErrorCode, LlmlbError
from common.inference import CompleteRequest
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import CHANNEL_OPTIONS, error_from_rpc
from common.types import Capability, ModelState
from devkit.echo_node import EchoNode

pytestmark = pytest.mark.timeout(60)

MODEL = "gemma-3-270m"  # in the packaged catalogue: chat, completion, embedding
CALL_TIMEOUT_S = 10.0
# gRPC rounds a deadline up on the wire (1-10 s: to the next 10 ms) and reads a cached clock when
# sending it, so each hop may lengthen it by a few ms, more on a loaded machine.
DEADLINE_SLACK_S = 0.1


@dataclass
class Door:
    """A started in-process balancer, its admin key and an Inference stub on its gRPC door."""

    balancer: Balancer
    key: str
    stub: igrpc.InferenceAsyncStub
    auth: tuple[tuple[str, str], ...]  # sent on each call: a channel-wide key reaches unary calls only

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.balancer.port}"


StartDoor = Callable[..., Awaitable[Door]]
StartNode = Callable[..., Awaitable[EchoNode]]


@pytest.fixture
async def start_door(tmp_path: Path) -> AsyncIterator[StartDoor]:
    started: list[tuple[Balancer, grpc.aio.Channel]] = []

    async def make(**env: str) -> Door:
        home = tmp_path / f"balancer{len(started)}"
        config = load_balancer_config(
            home=home, grpc_listen="127.0.0.1:0", http_listen="", env={"LLMLB_HOME": str(home), **env}
        )
        balancer = await start(config)
        key = config.admin_key_file.read_text().strip()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{balancer.port}", options=CHANNEL_OPTIONS)
        started.append((balancer, channel))
        return Door(balancer, key, igrpc.InferenceStub(channel), bearer_metadata(key))

    yield make
    for balancer, channel in started:
        await channel.close(None)
        await balancer.stop(grace=0)


@pytest.fixture
async def door(start_door: StartDoor) -> Door:
    return await start_door()


@pytest.fixture
async def start_node(door: Door) -> AsyncIterator[StartNode]:
    nodes: list[EchoNode] = []

    async def make(**knobs: Any) -> EchoNode:
        node = EchoNode(door.address, api_key=door.key, **knobs)
        nodes.append(node)
        await node.start()
        return node

    yield make
    for node in nodes:
        await node.stop()


def complete_request(prompt: str = "hello routed world", model: str = MODEL) -> ipb.CompleteRequest:
    return ipb.CompleteRequest(model=model, prompt=prompt)


async def complete(door: Door, prompt: str = "hello routed world", **kwargs: Any) -> list[ipb.TextChunk]:
    call = door.stub.Complete(complete_request(prompt, **kwargs), timeout=CALL_TIMEOUT_S, metadata=door.auth)
    return [chunk async for chunk in call]


async def failure(call: Awaitable[Any]) -> tuple[grpc.StatusCode, LlmlbError]:
    """The gRPC status and the llmlb error a call that must fail ended with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), error_from_rpc(info.value)


def answered_by(chunks: list[ipb.TextChunk]) -> str:
    return chunks[-1].node_id


# -- answers and spreading ----------------------------------------------------------------------


async def test_completion_streams_the_nodes_answer_through_the_balancer(door: Door, start_node: StartNode):
    node = await start_node()

    chunks = await complete(door, "hello routed world")

    assert "".join(c.delta for c in chunks) == "hello routed world"
    assert len(chunks) == 3
    assert chunks[-1].finish_reason == ipb.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens == 3
    assert {c.node_id for c in chunks} == {node.node_id}
    assert node.calls["complete"] == 1


async def test_chat_and_embeddings_are_answered_through_the_balancer(door: Door, start_node: StartNode):
    node = await start_node()

    chat = door.stub.Chat(
        ipb.ChatRequest(model=MODEL, messages=[ipb.ChatMessage(role="user", content="say this back")]),
        timeout=CALL_TIMEOUT_S,
        metadata=door.auth,
    )
    chunks = [c async for c in chat]
    embedded = await door.stub.Embed(
        ipb.EmbedRequest(model=MODEL, input=["one two", "three"]), timeout=CALL_TIMEOUT_S, metadata=door.auth
    )

    assert "".join(c.delta for c in chunks) == "say this back"
    assert chunks[-1].node_id == node.node_id
    assert [list(e.values) for e in embedded.data] == [[7.0, 2.0, 1.0], [5.0, 1.0, 1.0]]
    assert embedded.node_id == node.node_id
    assert node.calls == {"chat": 1, "embed": 1}


async def test_requests_spread_over_two_equal_nodes(door: Door, start_node: StartNode):
    a = await start_node(delay_s=0.02)
    b = await start_node(delay_s=0.02)

    async def client(n: int) -> list[str]:
        return [answered_by(await complete(door)) for _ in range(n)]

    answers = [n for batch in await asyncio.gather(*(client(5) for _ in range(8))) for n in batch]

    assert len(answers) == 40
    assert set(answers) == {a.node_id, b.node_id}
    assert min(answers.count(a.node_id), answers.count(b.node_id)) >= 10  # 40 over 2 nodes, 8 at once


async def test_most_traffic_goes_to_the_faster_node(door: Door, start_node: StartNode):
    slow = await start_node(delay_s=0.1)
    fast = await start_node()

    async def client(n: int) -> list[str]:
        return [answered_by(await complete(door)) for _ in range(n)]

    answers = [n for batch in await asyncio.gather(*(client(10) for _ in range(4))) for n in batch]

    assert len(answers) == 40
    assert answers.count(fast.node_id) >= 30
    assert slow.total_calls + fast.total_calls == 40


async def test_ready_node_is_preferred_over_a_node_with_the_model_only_on_disk(
    door: Door, start_node: StartNode
):
    on_disk = await start_node(state="present")
    ready = await start_node()

    answers = [answered_by(await complete(door)) for _ in range(10)]

    assert answers == [ready.node_id] * 10
    assert on_disk.total_calls == 0


# -- failures and retries -----------------------------------------------------------------------


async def test_stopped_node_is_routed_around(door: Door, start_node: StartNode):
    a = await start_node()
    b = await start_node()
    await a.stop()
    calls_before = a.total_calls

    answers = [answered_by(await complete(door)) for _ in range(10)]

    assert answers == [b.node_id] * 10
    assert a.total_calls == calls_before


async def test_unary_call_on_a_node_that_dies_is_retried_on_another(door: Door, start_node: StartNode):
    dying = await start_node()  # ready: tried first
    spare = await start_node(state="present")
    dying.close_on_call = True

    first = await door.stub.Embed(
        ipb.EmbedRequest(model=MODEL, input=["hi"]), timeout=CALL_TIMEOUT_S, metadata=door.auth
    )
    # Its server is gone while its session still looks alive: the next call finds the port closed.
    second = await door.stub.Embed(
        ipb.EmbedRequest(model=MODEL, input=["hi"]), timeout=CALL_TIMEOUT_S, metadata=door.auth
    )

    assert first.node_id == spare.node_id
    assert second.node_id == spare.node_id
    assert dying.calls["embed"] == 1  # it saw the first call, then died
    assert spare.calls["embed"] == 2


async def test_node_answering_internal_error_repeatedly_is_put_in_cooldown(door: Door, start_node: StartNode):
    broken = await start_node()
    broken.fail_with = ErrorCode.INTERNAL
    # Slower than a fresh node's latency estimate, so without a cooldown the broken node stays first choice.
    healthy = await start_node(delay_s=FIRST_LATENCY_S + 0.01)

    answers = [answered_by(await complete(door)) for _ in range(10)]

    assert answers == [healthy.node_id] * 10
    assert broken.calls["complete"] == door.balancer.config.cooldown_failures


@pytest.mark.parametrize("code", [ErrorCode.INTERNAL, ErrorCode.QUEUE_FULL, ErrorCode.NO_CAPABLE_NODES])
async def test_retryable_error_before_the_first_chunk_is_retried_on_another_node(
    door: Door, start_node: StartNode, code: ErrorCode
):
    failing = await start_node()  # ready: tried first
    failing.fail_with = code
    spare = await start_node(state="present")

    chunks = await complete(door, "still answered")

    assert "".join(c.delta for c in chunks) == "still answered"
    assert answered_by(chunks) == spare.node_id
    assert failing.calls["complete"] == 1


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.INTERNAL, grpc.StatusCode.INTERNAL),
        (ErrorCode.QUEUE_FULL, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
async def test_when_every_node_failed_the_caller_gets_the_nodes_own_error(
    door: Door, start_node: StartNode, code: ErrorCode, status: grpc.StatusCode
):
    for _ in range(2):
        node = await start_node()
        node.fail_with = code

    got_status, error = await failure(complete(door))

    assert (got_status, error.code) == (status, code)


async def test_a_node_refusing_the_balancers_credential_is_the_nodes_fault_never_the_clients_401(
    door: Door, start_node: StartNode
):
    refusing = await start_node()  # ready: tried first
    refusing.fail_with = ErrorCode.UNAUTHORIZED  # as a node's door answers a token it does not hold
    spare = await start_node(state="present")

    assert answered_by(await complete(door, "still answered")) == spare.node_id
    assert refusing.calls["complete"] == 1


async def test_when_every_node_refuses_the_balancers_credential_the_client_gets_503_not_401(
    door: Door, start_node: StartNode
):
    refusing = await start_node()
    refusing.fail_with = ErrorCode.UNAUTHORIZED

    status, error = await failure(complete(door))

    assert (status, error.code) == (grpc.StatusCode.UNAVAILABLE, ErrorCode.NO_CAPABLE_NODES)


async def test_request_error_from_a_node_is_returned_without_a_retry(door: Door, start_node: StartNode):
    refusing = await start_node()
    refusing.fail_with = ErrorCode.INVALID_REQUEST
    spare = await start_node(state="present")

    status, error = await failure(complete(door))

    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert error.code is ErrorCode.INVALID_REQUEST
    assert spare.total_calls == 0


async def test_error_after_the_first_chunk_ends_the_stream_with_that_error(door: Door, start_node: StartNode):
    failing = await start_node()
    failing.fail_with = ErrorCode.INTERNAL
    failing.fail_after_chunks = 1
    spare = await start_node(state="present")
    received: list[str] = []

    async def read() -> None:
        async for chunk in door.stub.Complete(
            complete_request("one two three"), timeout=CALL_TIMEOUT_S, metadata=door.auth
        ):
            received.append(chunk.delta)

    status, error = await failure(read())

    assert received == ["one"]
    assert status == grpc.StatusCode.INTERNAL
    assert error.code is ErrorCode.INTERNAL
    assert spare.total_calls == 0


# -- what cannot be routed ----------------------------------------------------------------------


async def test_unknown_model_is_not_found(door: Door, start_node: StartNode):
    await start_node()

    status, error = await failure(complete(door, model="no-such/model"))

    assert status == grpc.StatusCode.NOT_FOUND
    assert error.code is ErrorCode.MODEL_NOT_FOUND


async def test_model_without_the_capability_is_not_found(door: Door, start_node: StartNode):
    await start_node(models=("whisper-base",), capabilities=list(Capability))

    status, error = await failure(complete(door, model="whisper-base"))
    embed_status, embed_error = await failure(
        door.stub.Embed(
            ipb.EmbedRequest(model="whisper-base", input=["x"]), timeout=CALL_TIMEOUT_S, metadata=door.auth
        )
    )

    assert (status, error.code) == (grpc.StatusCode.NOT_FOUND, ErrorCode.MODEL_NOT_FOUND)
    assert "completion" in error.message
    assert (embed_status, embed_error.code) == (grpc.StatusCode.NOT_FOUND, ErrorCode.MODEL_NOT_FOUND)


async def test_no_node_online_is_unavailable(door: Door):
    status, error = await failure(complete(door))

    assert status == grpc.StatusCode.UNAVAILABLE
    assert error.code is ErrorCode.NO_CAPABLE_NODES


async def test_nodes_without_the_capability_do_not_count(door: Door, start_node: StartNode):
    await start_node(capabilities=[Capability.EMBEDDING])

    status, error = await failure(complete(door))

    assert status == grpc.StatusCode.UNAVAILABLE
    assert error.code is ErrorCode.NO_CAPABLE_NODES


async def test_a_request_for_a_model_still_downloading_waits_for_it_and_is_answered(
    door: Door, start_node: StartNode
):
    node = EchoNode(door.address, api_key=door.key, state="downloading")
    node.downloaded_bytes, node.total_bytes = 50, 100
    await node.start()
    try:
        asked = asyncio.create_task(complete(door))
        await wait_until(lambda: door.balancer.parts.router.waiting == 1, "the request waiting")
        assert not asked.done()
        node.state = ModelState.READY  # its next heartbeat reports the download done, the model loaded
        answer = await asked
    finally:
        await node.stop()

    assert answer[-1].node_id == node.node_id


async def test_a_request_waiting_for_a_download_that_never_ends_times_out_not_unavailable(
    start_door: StartDoor,
):
    door = await start_door(LLMLB_QUEUE_TIMEOUT="0.5")
    node = EchoNode(door.address, api_key=door.key, state="downloading")
    await node.start()
    try:
        status, error = await failure(complete(door))
    finally:
        await node.stop()

    assert status == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.code is ErrorCode.TIMEOUT


# -- the queue ----------------------------------------------------------------------------------


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(CALL_TIMEOUT_S / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never came to pass: {what}")


async def test_request_beyond_busy_nodes_and_a_full_queue_is_refused_with_queue_full(
    start_door: StartDoor,
):
    door = await start_door(LLMLB_NODE_MAX_INFLIGHT="1", LLMLB_QUEUE_SIZE="1")
    nodes = [EchoNode(door.address, api_key=door.key) for _ in range(2)]
    for node in nodes:
        await node.start()
        node.hold()
    try:
        running = [asyncio.create_task(complete(door)) for _ in range(2)]
        await wait_until(lambda: all(n.total_calls == 1 for n in nodes), "both nodes busy")
        queued = asyncio.create_task(complete(door))
        await wait_until(lambda: door.balancer.parts.router.waiting == 1, "one request queued")

        status, error = await failure(complete(door))

        assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.code is ErrorCode.QUEUE_FULL
        for node in nodes:
            node.release()
        answers = await asyncio.gather(*running, queued)
        assert all("".join(c.delta for c in chunks) == "hello routed world" for chunks in answers)
    finally:
        for node in nodes:
            await node.stop()


async def test_request_waiting_past_the_queue_timeout_gets_timeout(start_door: StartDoor):
    door = await start_door(LLMLB_NODE_MAX_INFLIGHT="1", LLMLB_QUEUE_TIMEOUT="0.3")
    node = EchoNode(door.address, api_key=door.key)
    await node.start()
    node.hold()
    try:
        running = asyncio.create_task(complete(door))
        await wait_until(lambda: node.total_calls == 1, "the node busy")

        status, error = await failure(complete(door))

        assert status == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.code is ErrorCode.TIMEOUT
        node.release()
        assert answered_by(await running) == node.node_id
        assert node.total_calls == 1  # the timed-out request never reached it
    finally:
        await node.stop()


# -- deadlines and cancellation -----------------------------------------------------------------


async def test_callers_deadline_reaches_the_node(door: Door, start_node: StartNode):
    node = await start_node()

    chunks = [c async for c in door.stub.Complete(complete_request(), timeout=2.0, metadata=door.auth)]
    await door.stub.Embed(ipb.EmbedRequest(model=MODEL, input=["x"]), timeout=4.0, metadata=door.auth)

    assert answered_by(chunks) == node.node_id
    complete_left, embed_left = (call.time_remaining for call in node.seen)
    assert complete_left is not None and 0 < complete_left <= 2.0 + DEADLINE_SLACK_S
    assert embed_left is not None and 2.0 + DEADLINE_SLACK_S < embed_left <= 4.0 + DEADLINE_SLACK_S


async def test_a_request_whose_deadline_has_passed_never_starts_work_on_a_node(
    door: Door, start_node: StartNode
):
    node = await start_node()
    request = CompleteRequest(model=MODEL, prompt="too late", request_id="late-1")

    with pytest.raises(LlmlbError) as late:
        await door.balancer.parts.router.complete_whole(request, timeout=0.0)

    assert late.value.code is ErrorCode.TIMEOUT
    assert node.total_calls == 0
    answered = await door.balancer.parts.router.complete_whole(request, timeout=CALL_TIMEOUT_S)
    assert answered[-1].node_id == node.node_id  # the node itself was there to answer


async def test_a_request_whose_deadline_is_shorter_than_an_answer_takes_is_refused_before_a_free_node_starts(
    door: Door, start_node: StartNode
):
    node = await start_node(delay_s=0.3)
    router = door.balancer.parts.router
    await router.complete_whole(CompleteRequest(model=MODEL, prompt="first", request_id="r-1"), timeout=5.0)
    calls = node.total_calls

    with pytest.raises(LlmlbError) as refused:
        await router.complete_whole(
            CompleteRequest(model=MODEL, prompt="hurried", request_id="r-2"), timeout=0.1
        )

    assert refused.value.code is ErrorCode.QUEUE_FULL and "deadline" in refused.value.message
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 0.0
    assert node.total_calls == calls  # the node, free, never started on it
    answered = await router.complete_whole(
        CompleteRequest(model=MODEL, prompt="patient", request_id="r-3"), timeout=5.0
    )
    assert answered[-1].node_id == node.node_id


async def test_cancelling_a_stream_midway_cancels_the_nodes_handler(door: Door, start_node: StartNode):
    node = await start_node(chunk_delay_s=0.05)
    words = " ".join(f"w{i}" for i in range(200))  # 10 s of chunks: far longer than the test

    call = door.stub.Complete(complete_request(words), timeout=CALL_TIMEOUT_S, metadata=door.auth)
    first = await call.read()
    call.cancel()
    await asyncio.wait_for(node.cancelled.wait(), 5.0)

    assert isinstance(first, ipb.TextChunk) and first.delta == "w0"
    assert node.seen[0].cancelled
