"""SIGTERM on a real `xllm serve` process: the node drains, finishes what it is doing, then exits.

The balancer runs with a long heartbeat interval, so seeing the node as draining well before the next
regular heartbeat shows the node told it at once.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from common.errors import ErrorCode
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import error_from_rpc
from devkit.fake_hub import FakeHub
from devkit.model_files import CACHE, ModelFiles
from tests.fixtures.eventually import eventually
from tests.integration.conftest import DIRECT_TOKEN, BalancerProcess, NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
NodeFactory = Callable[..., NodeProcess]
BalancerFactory = Callable[..., BalancerProcess]
HEARTBEAT_MS = 30_000


def log_event(node: NodeProcess, event: str, within: float) -> dict[str, Any]:
    """The first JSON log line of ``event`` the node writes within ``within`` seconds."""

    def logged() -> dict[str, Any] | None:
        for line in node.log().splitlines():
            if f'"{event}"' in line:
                record: dict[str, Any] = json.loads(line)
                if record.get("event") == event:
                    return record
        return None

    return eventually(logged, within, f"{event} in the node log", describe=node.log)


def node_state(balancer: BalancerProcess, node_id: str) -> pb.NodeState.ValueType:
    for node in balancer.registry.ListNodes(rpb.ListNodesRequest()).nodes:
        if node.id == node_id:
            return node.state
    return pb.NODE_STATE_UNSPECIFIED


def wait_state(balancer: BalancerProcess, node_id: str, state: pb.NodeState.ValueType, within: float) -> None:
    eventually(
        lambda: node_state(balancer, node_id) == state,
        within,
        f"node {node_id} {pb.NodeState.Name(state)}",
        describe=lambda: f"it is {pb.NodeState.Name(node_state(balancer, node_id))}",
    )


def chat(content: str, max_tokens: int) -> ipb.ChatRequest:
    return ipb.ChatRequest(
        model="gemma-3-270m",
        messages=[ipb.ChatMessage(role="user", content=content)],
        params=ipb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


def test_sigterm_lets_a_streamed_chat_finish_refuses_new_requests_and_exits_cleanly(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles
) -> None:
    balancer = balancer_factory(
        hub,
        LLMLB_HEARTBEAT_INTERVAL_MS=str(HEARTBEAT_MS),
        LLMLB_HEARTBEAT_TIMEOUT_MS=str(4 * HEARTBEAT_MS),
    )
    node = node_factory(
        balancer, hub, "--shared-dir", str(CACHE), XLLM_DRAIN_TIMEOUT="150", XLLM_AUTH_TOKEN=DIRECT_TOKEN
    )
    assert node.proc is not None
    wait_state(balancer, node.node_id, pb.NODE_STATE_ONLINE, within=10)
    with node.direct_channel() as channel:
        stub = igrpc.InferenceStub(channel)
        warm = list(stub.Chat(chat("Hi", 1), timeout=120))  # the model loads before the drain starts
        assert warm[-1].finish_reason != ipb.FINISH_REASON_UNSPECIFIED

        stream = iter(stub.Chat(chat("Count from one to one hundred.", 120), timeout=240))
        first = next(stream)
        node.proc.send_signal(signal.SIGTERM)
        stopping = log_event(node, "node.stopping", within=10)
        assert stopping["in_flight"] == 1
        log_event(node, "node.draining", within=5)
        # Told at once, not at the next regular heartbeat.
        wait_state(balancer, node.node_id, pb.NODE_STATE_DRAINING, within=5)

        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Chat(chat("Hello again", 4), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        error = error_from_rpc(refused.value)
        assert (error.code, error.message) == (ErrorCode.NO_CAPABLE_NODES, f"node {node.node_id} is draining")
        assert node.proc.poll() is None  # still waiting for the stream in flight

        rest = list(stream)
    chunks = [first, *rest]
    assert rest and all(c.finish_reason == ipb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].finish_reason in (ipb.FINISH_REASON_LENGTH, ipb.FINISH_REASON_STOP)
    assert chunks[-1].usage.completion_tokens > 1
    assert "".join(c.delta for c in chunks).strip()

    assert node.proc.wait(timeout=30) == 0
    drained = log_event(node, "node.drained", within=1)
    assert drained["seconds"] > 0
    wait_state(balancer, node.node_id, pb.NODE_STATE_OFFLINE, within=10)


def test_a_second_sigterm_stops_the_node_at_once_without_waiting_for_the_drain(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles
) -> None:
    balancer = balancer_factory(hub)
    node = node_factory(
        balancer, hub, "--shared-dir", str(CACHE), XLLM_DRAIN_TIMEOUT="120", XLLM_AUTH_TOKEN=DIRECT_TOKEN
    )
    assert node.proc is not None
    with node.direct_channel() as channel:
        stub = igrpc.InferenceStub(channel)
        stream = iter(stub.Chat(chat("Write a long story about a dragon.", 4000), timeout=120))
        next(stream)  # a generation that would take over a minute is in flight
        node.proc.send_signal(signal.SIGTERM)
        log_event(node, "node.draining", within=10)
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
        with pytest.raises(grpc.RpcError):
            list(stream)  # cut off: the node did not wait for it
    log_event(node, "node.stop_forced", within=1)
