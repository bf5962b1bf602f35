"""``llmlb nodes undrain``: a drained node goes back in rotation and takes work again, through the CLI,
the HTTP management route and gRPC; a node draining because it is shutting down cannot be undrained.

Real processes on 127.0.0.1: a balancer, an ``xllm serve`` node called directly too (its token), and
the ``llmlb`` CLI. Whether the node takes work is asked of the node itself: draining, it refuses every
call as ``no_capable_nodes``; taking work, a call for a model nobody has gets ``model_not_found``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import grpc
import httpx
import pytest

from common.errors import ErrorCode
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import error_from_rpc
from devkit.fake_hub import FakeHub
from tests.fixtures.eventually import consistently, eventually
from tests.integration.conftest import (
    DIRECT_TOKEN,
    BalancerProcess,
    NodeProcess,
    llmlb,
    pending_commands,
    wait_online,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
NodeFactory = Callable[..., NodeProcess]


def node_state(balancer: BalancerProcess, node_id: str) -> int:
    nodes = balancer.registry.ListNodes(rpb.ListNodesRequest(), timeout=5).nodes
    return next(n.state for n in nodes if n.id == node_id)


def refusal_of_a_direct_call(node: NodeProcess, model: str = "acme/nothing") -> ErrorCode:
    """What the node answers a completion for ``model`` (one nobody has, unless given)."""
    with node.direct_channel() as channel, pytest.raises(grpc.RpcError) as refused:
        list(igrpc.InferenceStub(channel).Complete(ipb.CompleteRequest(model=model, prompt="x"), timeout=10))
    return error_from_rpc(refused.value).code


def drained(balancer: BalancerProcess, node: NodeProcess) -> None:
    balancer.registry.DrainNode(rpb.DrainNodeRequest(node_id=node.node_id), timeout=10)
    eventually(lambda: refusal_of_a_direct_call(node) is ErrorCode.NO_CAPABLE_NODES, 10, "the node draining")
    assert node_state(balancer, node.node_id) == pb.NODE_STATE_DRAINING


def back_in_rotation(balancer: BalancerProcess, node: NodeProcess) -> None:
    eventually(
        lambda: refusal_of_a_direct_call(node) is ErrorCode.MODEL_NOT_FOUND, 10, "the node taking work"
    )
    eventually(lambda: node_state(balancer, node.node_id) == pb.NODE_STATE_ONLINE, 10, "the node online")
    # Its heartbeats agree now: nothing puts it back to draining.
    consistently(lambda: node_state(balancer, node.node_id) == pb.NODE_STATE_ONLINE, 1.5, "still online")
    eventually(lambda: pending_commands(balancer, node.node_id) == [], 10, "the undrain acknowledged")


def test_a_drained_node_is_undrained_by_the_cli_and_by_the_http_route_and_takes_work_again(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    node = node_factory(balancer, hub, XLLM_AUTH_TOKEN=DIRECT_TOKEN)
    wait_online(balancer, node)
    assert refusal_of_a_direct_call(node) is ErrorCode.MODEL_NOT_FOUND

    drained(balancer, node)
    done = llmlb("nodes", "undrain", node.node_id, "--balancer", balancer.address, home=balancer.home)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"node {node.node_id} takes new work again"
    back_in_rotation(balancer, node)
    assert node.log().count('"node.undrained"') == 1

    drained(balancer, node)
    headers = {"authorization": f"Bearer {balancer.admin_key}"}
    reply = httpx.post(f"{balancer.http_url}/v0/nodes/{node.node_id}/undrain", headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"id": node.node_id, "state": "online"}
    back_in_rotation(balancer, node)

    missing = llmlb("nodes", "undrain", "ghost", "--balancer", balancer.address, home=balancer.home)
    assert missing.returncode != 0 and "node_not_found" in missing.stderr


def test_a_node_drained_while_offline_and_undrained_before_it_returns_comes_back_in_rotation(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    node = node_factory(balancer, hub, XLLM_AUTH_TOKEN=DIRECT_TOKEN)
    wait_online(balancer, node)
    node.stop()
    eventually(lambda: node_state(balancer, node.node_id) == pb.NODE_STATE_OFFLINE, 10, "the node offline")
    balancer.registry.DrainNode(rpb.DrainNodeRequest(node_id=node.node_id), timeout=10)
    reply = balancer.registry.UndrainNode(rpb.UndrainNodeRequest(node_id=node.node_id), timeout=10)
    assert (reply.id, reply.state) == (node.node_id, pb.NODE_STATE_OFFLINE)
    assert ("drain", "") not in pending_commands(balancer, node.node_id)  # the queued drain is dropped
    node.start()
    back_in_rotation(balancer, node)


def test_a_node_shutting_down_cannot_be_undrained(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    data = b"GGUF" + bytes(2 * 1024 * 1024)
    hub.add_repo("acme/slow", {"s.gguf": data})
    balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/slow"), timeout=30)
    node = node_factory(balancer, hub, XLLM_AUTH_TOKEN=DIRECT_TOKEN, XLLM_DRAIN_TIMEOUT="60")
    wait_online(balancer, node)
    assert node.proc is not None
    hub.set_throttle(16 * 1024)  # the file takes minutes: the call below stays in flight meanwhile
    with node.direct_channel() as channel:
        # A streaming call starts at once; it waits in the node for the model's files.
        waiting = igrpc.InferenceStub(channel).Complete(
            ipb.CompleteRequest(model="acme/slow", prompt="x"), timeout=60
        )
        eventually(lambda: "acme/slow" in node.log(), 10, "the node fetching the model for the call")
        node.proc.send_signal(signal.SIGTERM)  # drains, waiting for that call
        eventually(lambda: node_state(balancer, node.node_id) == pb.NODE_STATE_DRAINING, 10, "draining")

        done = llmlb("nodes", "undrain", node.node_id, "--balancer", balancer.address, home=balancer.home)
        assert done.returncode != 0 and "node_stopping" in done.stderr and "shutting down" in done.stderr
        headers = {"authorization": f"Bearer {balancer.admin_key}"}
        reply = httpx.post(
            f"{balancer.http_url}/v0/nodes/{node.node_id}/undrain", headers=headers, timeout=10
        )
        assert reply.status_code == 409 and reply.json()["error"]["code"] == "node_stopping"
        assert "shutting down" in reply.json()["error"]["message"]
        assert node_state(balancer, node.node_id) == pb.NODE_STATE_DRAINING
        node.proc.send_signal(signal.SIGTERM)  # a second signal: stop without waiting for the call
        assert node.proc.wait(timeout=20) == 0
        waiting.cancel()  # type: ignore[no-untyped-call]  # grpc's stubs leave it untyped
