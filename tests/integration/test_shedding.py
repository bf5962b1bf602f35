"""Past capacity, both doors refuse at once what they could not answer in time, and nothing times out.

One balancer in this process with both doors open on 127.0.0.1, and one echo node (``devkit.echo_node``)
that takes one call at a time (``LLMLB_NODE_MAX_INFLIGHT=1``) and answers after half a second, held
busy by the test where it needs a saturated node. What a caller sees: the answered requests, the
refusals (429 / RESOURCE_EXHAUSTED ``queue_full`` with ``Retry-After``, in under 100 ms), the deadline
of ``X-Request-Timeout`` or ``grpc-timeout``, and how many calls reached the node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from common.errors import GRPC_CODE_KEY, GRPC_RETRY_AFTER_KEY
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.types import Scope
from devkit.echo_node import EchoNode
from tests.fixtures.doors import CALL_TIMEOUT_S, Doors, open_doors
from tests.fixtures.eventually import eventually_async

pytestmark = pytest.mark.timeout(60)
MODEL = "gemma-3-270m"
SERVICE_S = 0.5  # how long the node takes to answer
FAST_S = 0.1  # a refusal comes back within this
# With one slot and 0.5 s per answer, the k-th queued request expects to wait k times 0.5 s: two fit in
# 1.3 s, a third (1.5 s) does not.
MAX_WAIT_S = "1.3"


@dataclass(frozen=True)
class Outcome:
    """What one request came back with, on either door."""

    status: str  # "200"/"429"/... on HTTP, the gRPC status name on gRPC
    code: str  # llmlb's error code, "" when answered
    retry_after: str  # the Retry-After header or trailer, "" when absent
    seconds: float


async def http_complete(doors: Doors, request_timeout: str | None = None) -> Outcome:
    headers = doors.headers(Scope.API)
    if request_timeout is not None:
        headers["x-request-timeout"] = request_timeout
    started = time.monotonic()
    reply = await doors.http.post(
        "/v1/completions", json={"model": MODEL, "prompt": "one two", "max_tokens": 2}, headers=headers
    )
    seconds = time.monotonic() - started
    code = "" if reply.status_code == 200 else reply.json()["error"]["code"]
    return Outcome(str(reply.status_code), code, reply.headers.get("retry-after", ""), seconds)


async def grpc_complete(doors: Doors, deadline_s: float = CALL_TIMEOUT_S) -> Outcome:
    request = ipb.CompleteRequest(model=MODEL, prompt="one two")
    started = time.monotonic()
    try:
        call = doors.inference.Complete(request, timeout=deadline_s, metadata=doors.metadata(Scope.API))
        _ = [chunk async for chunk in call]
    except grpc.aio.AioRpcError as exc:
        metadata: Any = exc.trailing_metadata() or ()
        trailing = {str(k): str(v) for k, v in metadata}
        code, wait = trailing.get(GRPC_CODE_KEY, ""), trailing.get(GRPC_RETRY_AFTER_KEY, "")
        return Outcome(exc.code().name, str(code), str(wait), time.monotonic() - started)
    return Outcome(grpc.StatusCode.OK.name, "", "", time.monotonic() - started)


@asynccontextmanager
async def doors_with(tmp_path: Path, **env: str) -> AsyncIterator[tuple[Doors, EchoNode]]:
    """Both doors of one balancer (``env`` added to its settings) and its one echo node."""
    async with open_doors(tmp_path / "balancer", {"LLMLB_NODE_MAX_INFLIGHT": "1", **env}) as doors:
        node = EchoNode(
            f"127.0.0.1:{doors.balancer.port}", api_key=doors.secrets[Scope.ADMIN], delay_s=SERVICE_S
        )
        await node.start()
        try:
            yield doors, node
        finally:
            await node.stop()


@pytest.fixture
async def saturable(tmp_path: Path) -> AsyncIterator[tuple[Doors, EchoNode]]:
    async with doors_with(tmp_path, LLMLB_MAX_QUEUE_WAIT=MAX_WAIT_S) as pair:
        yield pair


async def queued(doors: Doors, count: int) -> None:
    router = doors.balancer.parts.router
    await eventually_async(lambda: router.waiting == count, what=f"{count} request(s) queued")


async def test_past_capacity_both_doors_refuse_at_once_with_retry_after_and_none_times_out(
    saturable: tuple[Doors, EchoNode],
):
    doors, node = saturable
    assert (await http_complete(doors)).status == "200"  # one answer: the balancer learns 0.5 s
    node.hold()
    running = asyncio.create_task(http_complete(doors))
    await eventually_async(lambda: node.total_calls == 2, what="the node busy")
    waiting = [asyncio.create_task(grpc_complete(doors)), asyncio.create_task(http_complete(doors))]
    await queued(doors, 2)

    refused = []
    for _ in range(3):  # one after another, so each one's time is its own
        refused += [await http_complete(doors), await grpc_complete(doors)]
    node.release()
    answered = await asyncio.gather(running, *waiting)

    assert [(o.status, o.code) for o in refused] == [
        ("429", "queue_full"),
        ("RESOURCE_EXHAUSTED", "queue_full"),
    ] * 3
    assert all(o.retry_after == "2" for o in refused), refused  # a third in the queue would wait 1.5 s
    assert max(o.seconds for o in refused) < FAST_S, refused
    assert [o.status for o in answered] == ["200", "OK", "200"], answered
    assert node.total_calls == 4  # the warm-up, the running one and the two queued: no refused one


async def test_a_request_whose_deadline_is_too_short_for_the_wait_is_refused_at_once(
    tmp_path: Path,
):
    async with doors_with(tmp_path) as (doors, node):  # the default maximum wait, 15 s: deadlines count
        assert (await http_complete(doors)).status == "200"
        node.hold()
        running = asyncio.create_task(grpc_complete(doors))
        await eventually_async(lambda: node.total_calls == 2, what="the node busy")

        # 0.5 s until the slot frees, then 0.5 s to answer: 0.8 s is too short on either door.
        short_http = await http_complete(doors, request_timeout="0.8")
        short_grpc = await grpc_complete(doors, deadline_s=0.8)
        roomy = asyncio.create_task(http_complete(doors, request_timeout="5"))
        await queued(doors, 1)
        bad = await http_complete(doors, request_timeout="soon")
        node.release()
        answered = await asyncio.gather(running, roomy)

        assert (short_http.status, short_http.code, short_http.retry_after) == ("429", "queue_full", "1")
        assert (short_grpc.status, short_grpc.code, short_grpc.retry_after) == (
            "RESOURCE_EXHAUSTED",
            "queue_full",
            "1",
        )
        assert max(short_http.seconds, short_grpc.seconds) < FAST_S
        assert (bad.status, bad.code) == ("400", "invalid_request")
        assert [o.status for o in answered] == ["OK", "200"]
        assert node.total_calls == 3
        left = node.seen[-1].time_remaining  # the header's deadline went on to the node, less the wait
        assert left is not None and 0 < left < 5.0


async def test_a_request_whose_deadline_passes_while_queued_never_reaches_the_node(tmp_path: Path):
    async with doors_with(tmp_path) as (doors, node):
        node.hold()  # before any answer: the balancer has no estimate, so both requests queue
        running = asyncio.create_task(http_complete(doors))
        await eventually_async(lambda: node.total_calls == 1, what="the node busy")

        late_http = asyncio.create_task(http_complete(doors, request_timeout="0.5"))
        late_grpc = asyncio.create_task(grpc_complete(doors, deadline_s=0.5))
        await queued(doors, 2)
        # Each leaves the queue at its deadline, while the node is still busy.
        http_outcome, grpc_outcome = await asyncio.wait_for(asyncio.gather(late_http, late_grpc), 5.0)
        await queued(doors, 0)
        node.release()

        assert (http_outcome.status, http_outcome.code) == ("504", "timeout")
        assert grpc_outcome.status == "DEADLINE_EXCEEDED"
        assert (await running).status == "200"
        assert node.total_calls == 1  # neither reached the node, before or after it freed up
