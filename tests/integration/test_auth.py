"""API keys at the balancer's gRPC door, and the node-management RPCs, with real processes on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import ErrorCode, LlmlbError
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import error_from_rpc
from devkit.fake_hub import FakeHub
from devkit.model_files import CACHE, ModelFiles
from tests.fixtures.eventually import consistently, eventually
from tests.integration.conftest import BalancerProcess, NodeProcess, llmlb, sync_channel

pytestmark = pytest.mark.slow
NodeFactory = Callable[..., NodeProcess]
GGUF = b"GGUF" + bytes(range(256)) * 16


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, LlmlbError]:
    """Runs a call that must fail; its gRPC status and the llmlb error it carries."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = cast(grpc.Call, info.value)
    return err.code(), error_from_rpc(info.value)


def registry_with(balancer: BalancerProcess, api_key: str) -> rgrpc.RegistryStub:
    return rgrpc.RegistryStub(sync_channel(balancer.address, api_key, balancer.tls))


def create_key(balancer: BalancerProcess, name: str, *scopes: pb.Scope.ValueType) -> rpb.CreateKeyResponse:
    return balancer.registry.CreateKey(rpb.CreateKeyRequest(name=name, scopes=scopes), timeout=10)


def node_state(balancer: BalancerProcess, node_id: str) -> int | None:
    """The node's state in ListNodes; None when the balancer does not know it."""
    for node in balancer.registry.ListNodes(rpb.ListNodesRequest(), timeout=5).nodes:
        if node.id == node_id:
            return node.state
    return None


def online_node(
    node_factory: NodeFactory, balancer: BalancerProcess, hub: FakeHub, *args: str
) -> NodeProcess:
    node = node_factory(balancer, hub, *args)
    eventually(lambda: (node.home / "node-id").exists(), 15, "a registered node")
    eventually(lambda: node_state(balancer, node.node_id) == pb.NODE_STATE_ONLINE, 15, "the node online")
    return node


# -- the door ------------------------------------------------------------------------------------


def test_a_call_without_a_key_is_unauthenticated_but_health_checks_are_open(
    balancer: BalancerProcess,
) -> None:
    with sync_channel(balancer.address) as channel:
        status, error = refusal(lambda: rgrpc.RegistryStub(channel).ListModels(rpb.ListModelsRequest()))
        assert status == grpc.StatusCode.UNAUTHENTICATED
        assert error.code is ErrorCode.UNAUTHORIZED
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    status, error = refusal(
        lambda: registry_with(balancer, "llmlb-made-up").ListModels(rpb.ListModelsRequest())
    )
    assert (status, error.code) == (grpc.StatusCode.UNAUTHENTICATED, ErrorCode.UNAUTHORIZED)


def test_an_api_key_reads_the_catalogue_but_may_not_delete_a_model(
    balancer: BalancerProcess, hub: FakeHub
) -> None:
    hub.add_repo("acme/kept", {"k.gguf": GGUF})
    balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/kept"))
    api = registry_with(balancer, create_key(balancer, "frontend", pb.SCOPE_API).secret)
    assert "acme/kept" in {m.id for m in api.ListModels(rpb.ListModelsRequest()).models}
    status, error = refusal(lambda: api.DeleteModel(rpb.DeleteModelRequest(model_id="acme/kept")))
    assert (status, error.code) == (grpc.StatusCode.PERMISSION_DENIED, ErrorCode.FORBIDDEN)
    status, error = refusal(lambda: api.CreateKey(rpb.CreateKeyRequest(name="x", scopes=[pb.SCOPE_ADMIN])))
    assert (status, error.code) == (grpc.StatusCode.PERMISSION_DENIED, ErrorCode.FORBIDDEN)
    assert balancer.registry.GetModel(rpb.GetModelRequest(model_id="acme/kept")).id == "acme/kept"


def test_keys_from_create_key_work_are_listed_without_secrets_and_revoke_at_once(
    balancer: BalancerProcess,
) -> None:
    made = create_key(balancer, "ci", pb.SCOPE_API, pb.SCOPE_NODE)
    assert made.secret.startswith(made.key.prefix) and len(made.secret) > len(made.key.prefix) + 20
    assert list(made.key.scopes) == [pb.SCOPE_API, pb.SCOPE_NODE]
    ci = registry_with(balancer, made.secret)
    ci.ListModels(rpb.ListModelsRequest())

    listed = balancer.registry.ListKeys(rpb.ListKeysRequest())
    assert made.secret.encode() not in listed.SerializeToString()
    assert listed.keys[0].name == "admin"  # the bootstrap key, oldest first
    mine = next(k for k in listed.keys if k.id == made.key.id)
    assert mine.prefix == made.key.prefix and not mine.HasField("revoked_at")

    revoked = balancer.registry.RevokeKey(rpb.RevokeKeyRequest(key=made.key.prefix))
    assert revoked.id == made.key.id and revoked.HasField("revoked_at")
    status, error = refusal(lambda: ci.ListModels(rpb.ListModelsRequest()))  # at once, no grace period
    assert (status, error.code) == (grpc.StatusCode.UNAUTHENTICATED, ErrorCode.UNAUTHORIZED)
    again = next(k for k in balancer.registry.ListKeys(rpb.ListKeysRequest()).keys if k.id == made.key.id)
    assert again.HasField("revoked_at")

    status, error = refusal(lambda: balancer.registry.RevokeKey(rpb.RevokeKeyRequest(key=made.key.id)))
    assert (status, error.code) == (grpc.StatusCode.NOT_FOUND, ErrorCode.KEY_NOT_FOUND)
    status, error = refusal(lambda: balancer.registry.CreateKey(rpb.CreateKeyRequest(name="none")))
    assert (status, error.code) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorCode.INVALID_REQUEST)


def test_a_node_needs_a_node_key_to_register(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    api_only = create_key(balancer, "wrong-kind", pb.SCOPE_API).secret
    refused = node_factory(balancer, hub, XLLM_API_KEY=api_only)
    eventually(lambda: "this call needs node" in refused.log(), 15, "the node logging why it was refused")
    assert "PERMISSION_DENIED" in refused.log()
    assert not (refused.home / "node-id").exists()
    assert balancer.registry.ListNodes(rpb.ListNodesRequest()).nodes == []

    accepted = online_node(node_factory, balancer, hub)  # the fixture's node-scoped key
    assert [n.id for n in balancer.registry.ListNodes(rpb.ListNodesRequest()).nodes] == [accepted.node_id]


# -- the admin key an operator chooses (LLMLB_ADMIN_KEY) -----------------------------------------------

ADMIN_KEY = "llmlb-" + "0123456789abcdef" * 4


def test_llmlb_admin_key_is_the_admin_key_from_the_first_start_on_and_is_never_written_or_logged(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub
) -> None:
    balancer = balancer_factory(hub, LLMLB_ADMIN_KEY=ADMIN_KEY)
    assert not (balancer.home / "admin-key").exists()
    listed = registry_with(balancer, ADMIN_KEY).ListKeys(rpb.ListKeysRequest(), timeout=10).keys
    assert [(k.prefix, list(k.scopes)) for k in listed] == [(ADMIN_KEY[:12], [pb.SCOPE_ADMIN])]

    balancer.restart()  # the same setting again: nothing new is stored
    listed = registry_with(balancer, ADMIN_KEY).ListKeys(rpb.ListKeysRequest(), timeout=10).keys
    assert len(listed) == 1 and not (balancer.home / "admin-key").exists()
    assert '"key.seeded"' in balancer.log() and ADMIN_KEY not in balancer.log()
    assert "created the first admin key" not in balancer.log()
    # On the balancer's host, with its environment, the CLI sends that key.
    at = ("--balancer", balancer.address)
    listed_by_cli = llmlb("keys", "list", *at, home=balancer.home, env={"LLMLB_ADMIN_KEY": ADMIN_KEY})
    assert listed_by_cli.returncode == 0 and ADMIN_KEY[:12] in listed_by_cli.stdout, listed_by_cli.stderr


def test_a_malformed_llmlb_admin_key_stops_the_balancer_with_one_line_that_does_not_repeat_it(
    tmp_path: Path,
) -> None:
    bad = "llmlb-too-short-to-be-a-key"
    done = llmlb("serve", "--grpc-listen", "127.0.0.1:0", home=tmp_path, env={"LLMLB_ADMIN_KEY": bad})
    assert done.returncode == 2
    assert done.stderr.startswith("llmlb: configuration error: LLMLB_ADMIN_KEY is malformed")
    assert done.stderr.count("\n") == 1 and bad not in done.stderr
    assert not (tmp_path / "llmlb.db").exists()


# -- node management -----------------------------------------------------------------------------


def test_drain_takes_a_node_out_of_rotation_and_it_stays_out_across_a_balancer_restart(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    node = online_node(node_factory, balancer, hub)
    reply = balancer.registry.DrainNode(rpb.DrainNodeRequest(node_id=node.node_id))
    assert (reply.id, reply.state) == (node.node_id, pb.NODE_STATE_DRAINING)
    assert node_state(balancer, node.node_id) == pb.NODE_STATE_DRAINING
    eventually(lambda: '"node.draining"' in node.log(), 5, "the node told to drain")

    balancer.restart()
    eventually(lambda: node_state(balancer, node.node_id) == pb.NODE_STATE_DRAINING, 15, "draining again")
    # Heartbeats keep it out of rotation.
    consistently(lambda: node_state(balancer, node.node_id) == pb.NODE_STATE_DRAINING, 2.0, "still draining")
    status, error = refusal(lambda: balancer.registry.DrainNode(rpb.DrainNodeRequest(node_id="nope")))
    assert (status, error.code) == (grpc.StatusCode.NOT_FOUND, ErrorCode.NODE_NOT_FOUND)


def test_a_node_drained_while_offline_is_told_when_it_reconnects_even_after_a_restart(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    node = online_node(node_factory, balancer, hub)
    node.stop()  # a node drains itself on SIGTERM, so count what its log already says
    eventually(lambda: node_state(balancer, node.node_id) == pb.NODE_STATE_OFFLINE, 5, "the node offline")
    drains = node.log().count('"node.draining"')
    balancer.registry.DrainNode(rpb.DrainNodeRequest(node_id=node.node_id))
    balancer.restart()  # the command lives in the store, not in the process
    node.start()
    eventually(lambda: node.log().count('"node.draining"') == drains + 1, 15, "the node told to drain")
    eventually(lambda: node_state(balancer, node.node_id) == pb.NODE_STATE_DRAINING, 5, "draining")


def test_remove_node_forgets_an_offline_node(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    node = online_node(node_factory, balancer, hub)
    node.stop()
    reply = balancer.registry.RemoveNode(rpb.RemoveNodeRequest(node_id=node.node_id))
    assert reply.node_id == node.node_id
    assert node_state(balancer, node.node_id) is None
    status, error = refusal(lambda: balancer.registry.RemoveNode(rpb.RemoveNodeRequest(node_id=node.node_id)))
    assert (status, error.code) == (grpc.StatusCode.NOT_FOUND, ErrorCode.NODE_NOT_FOUND)


def test_remove_node_drains_a_connected_node_and_closes_its_session(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    node = online_node(node_factory, balancer, hub)
    balancer.registry.RemoveNode(rpb.RemoveNodeRequest(node_id=node.node_id), timeout=10)
    eventually(lambda: '"node.draining"' in node.log(), 5, "the drain delivered before the session closed")
    eventually(
        lambda: "was removed from the balancer" in node.log(), 5, "the node told why its session ended"
    )
    eventually(lambda: '"balancer.removed"' in node.log(), 5, "the node stops its link")
    # It does not register again until it is restarted.
    consistently(lambda: node_state(balancer, node.node_id) is None, 2.0, "the node still forgotten")


def test_pull_model_makes_a_node_fetch_and_load_it(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles
) -> None:
    node = online_node(node_factory, balancer, hub, "--shared-dir", str(CACHE))
    registry = balancer.registry
    assert registry.GetModelStatus(rpb.GetModelStatusRequest(model_id="gemma-3-270m")).status in (
        pb.MODEL_STATE_ABSENT,
        pb.MODEL_STATE_PRESENT,
    )
    status, error = refusal(lambda: registry.PullModel(rpb.PullModelRequest(model_id="acme/nothing")))
    assert (status, error.code) == (grpc.StatusCode.NOT_FOUND, ErrorCode.MODEL_NOT_FOUND)
    status, error = refusal(
        lambda: registry.PullModel(rpb.PullModelRequest(model_id="gemma-3-270m", node_ids=["ghost"]))
    )
    assert (status, error.code) == (grpc.StatusCode.NOT_FOUND, ErrorCode.NODE_NOT_FOUND)

    reply = registry.PullModel(rpb.PullModelRequest(model_id="Gemma-3-270M"))
    assert (reply.model_id, list(reply.node_ids)) == ("gemma-3-270m", [node.node_id])
    eventually(
        lambda: (
            registry.GetModelStatus(rpb.GetModelStatusRequest(model_id="gemma-3-270m")).status
            == pb.MODEL_STATE_READY
        ),
        120,
        "gemma ready on the node",
    )
    assert not list(node.models_dir.rglob("*.gguf"))  # used in place from the shared dir
