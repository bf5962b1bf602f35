"""A node's own port, as real processes. With nothing set it serves only callers holding the fleet
token (the balancer on routed calls, peers fetching blobs) and refuses a direct caller. Started with
``XLLM_AUTH_TOKEN``, it also serves callers presenting that, the balancer presents it, and no listing
shows it."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from balancer.fleet.token import SECRET_NAME, derive
from common.channels import bearer_metadata
from common.errors import ErrorCode
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import error_from_rpc
from devkit.fake_hub import FakeHub
from devkit.model_files import CACHE, ModelFiles
from tests.fixtures.eventually import eventually
from tests.integration.conftest import (
    ROOT,
    BalancerProcess,
    NodeProcess,
    sync_channel,
    wait_online,
    xllm,
)

pytestmark = pytest.mark.slow
NodeFactory = Callable[..., NodeProcess]
TOKEN = "node-fleet-token-5f1c2a"
PROMPT = ipb.CompleteRequest(
    model="gemma-3-270m", prompt="One, two,", params=ipb.SamplingParams(max_tokens=3, temperature=0.0)
)


def text(chunks: list[ipb.TextChunk]) -> str:
    return "".join(c.delta for c in chunks)


def fleet_token(balancer: BalancerProcess) -> str:
    """The token the balancer hands its nodes, derived from the secret in its store."""
    with sqlite3.connect(balancer.home / "llmlb.db") as db:
        row = db.execute("SELECT secret FROM balancer_secrets WHERE name = ?", (SECRET_NAME,)).fetchone()
    return derive(row[0], int(time.time() // 3600))  # the default LLMLB_FLEET_TOKEN_TTL


def test_with_nothing_set_a_direct_caller_is_refused_while_routed_calls_and_peer_fetches_work(
    balancer_factory: Callable[..., BalancerProcess],
    hub: FakeHub,
    node_factory: NodeFactory,
    gemma: ModelFiles,
) -> None:
    balancer = balancer_factory(hub)
    node = node_factory(balancer, hub, "--shared-dir", str(CACHE))  # no XLLM_AUTH_TOKEN
    wait_online(balancer, node, within=15)

    with grpc.insecure_channel(node.address) as direct:
        for metadata in ((), bearer_metadata("a-guessed-token"), bearer_metadata(balancer.node_key)):
            with pytest.raises(grpc.RpcError) as refused:
                list(igrpc.InferenceStub(direct).Complete(PROMPT, timeout=30, metadata=metadata))
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert error_from_rpc(refused.value).code is ErrorCode.UNAUTHORIZED
        blob = mpb.ReadBlobRequest(model_id="gemma-3-270m", filename="x.gguf")
        with pytest.raises(grpc.RpcError) as unread:
            list(mgrpc.ManifestStub(direct).ReadBlob(blob, timeout=30))
        assert unread.value.code() is grpc.StatusCode.UNAUTHENTICATED

    with sync_channel(balancer.address, balancer.admin_key) as channel:
        routed = list(igrpc.InferenceStub(channel).Complete(PROMPT, timeout=120))
    assert text(routed).strip() and routed[-1].node_id == node.node_id

    # A peer fetch between two nodes that were given nothing but the balancer's address and key.
    data = b"GGUF" + hashlib.sha256(b"fleet").digest() * (1024 * 1024 // 32)
    hub.add_repo("acme/fleet-peer", {"p.gguf": data})
    model_id = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/fleet-peer")).id
    holder = node_factory(balancer, hub, start=False)
    pulled = xllm(
        holder.home,
        "pull",
        "--balancer",
        balancer.address,
        "--models-dir",
        str(holder.models_dir),
        model_id,
        env={"HF_ENDPOINT": hub.url},
    )
    assert pulled.returncode == 0, pulled.stderr
    holder.start()
    fetcher = node_factory(balancer, hub, HF_ENDPOINT="http://127.0.0.1:9")  # no way to the origin
    wait_online(balancer, holder, fetcher, within=15)

    def held() -> bool:
        status = balancer.registry.GetModelStatus(rpb.GetModelStatusRequest(model_id=model_id))
        return any(n.node_id == holder.node_id and n.state == pb.MODEL_STATE_PRESENT for n in status.nodes)

    eventually(held, 10, "the model present on the holder")
    hub.clear_log()
    balancer.registry.PullModel(rpb.PullModelRequest(model_id=model_id, node_ids=[fetcher.node_id]))
    fetched = fetcher.models_dir / model_id / "p.gguf"
    eventually(
        lambda: fetched.exists() and fetched.read_bytes() == data, 30, "the file fetched from the peer"
    )
    assert hub.bytes_served() == 0
    assert '"node.auth_refused"' not in holder.log()

    token = fleet_token(balancer)
    for log in (balancer.log(), node.log(), holder.log(), fetcher.log()):
        assert token not in log


def test_a_node_with_a_token_serves_only_callers_that_present_it_and_the_balancer_does(
    balancer_factory: Callable[..., BalancerProcess],
    hub: FakeHub,
    node_factory: NodeFactory,
    gemma: ModelFiles,
) -> None:
    balancer = balancer_factory(hub)
    node = node_factory(balancer, hub, "--shared-dir", str(CACHE), XLLM_AUTH_TOKEN=TOKEN)
    wait_online(balancer, node, within=15)

    with grpc.insecure_channel(node.address) as direct:
        stub = igrpc.InferenceStub(direct)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Complete(PROMPT, timeout=30))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "XLLM_AUTH_TOKEN" in (refused.value.details() or "")
        served = list(stub.Complete(PROMPT, timeout=120, metadata=bearer_metadata(TOKEN)))
        assert text(served).strip() and served[-1].node_id == node.node_id
        # The fleet token opens it too: the node registered, so it holds that as well.
        fleet = list(stub.Complete(PROMPT, timeout=120, metadata=bearer_metadata(fleet_token(balancer))))
        assert text(fleet).strip()

    with sync_channel(balancer.address, balancer.admin_key) as channel:
        routed = list(igrpc.InferenceStub(channel).Complete(PROMPT, timeout=120))
    assert text(routed).strip() and routed[-1].node_id == node.node_id

    listed = subprocess.run(
        [sys.executable, "-m", "balancer.cli", "nodes", "list", "--json", "--balancer", balancer.address],
        cwd=ROOT,
        env={**os.environ, "LLMLB_HOME": str(balancer.home)},  # the CLI finds the admin key there
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr
    assert node.node_id in listed.stdout and TOKEN not in listed.stdout
    request = urllib.request.Request(
        f"{balancer.http_url}/v0/nodes", headers={"Authorization": f"Bearer {balancer.admin_key}"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        shown = reply.read().decode()
    assert node.node_id in shown and TOKEN not in shown
    assert TOKEN not in balancer.log() and TOKEN not in node.log()


def test_a_peer_serves_pulls_that_share_its_token_or_ask_the_balancer_for_the_fleets(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory, tmp_path: Path
) -> None:
    data = b"GGUF" + hashlib.sha256(b"peer").digest() * (1024 * 1024 // 32)
    hub.add_repo("acme/guarded", {"g.gguf": data})
    model_id = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/guarded")).id
    holder = node_factory(balancer, hub, start=False, XLLM_AUTH_TOKEN=TOKEN)

    def pull(home: Path, token: str, hub_url: str) -> subprocess.CompletedProcess[str]:
        args = ["pull", "--balancer", balancer.address, "--models-dir", str(home / "models"), model_id]
        return xllm(home, *args, env={"HF_ENDPOINT": hub_url, "XLLM_AUTH_TOKEN": token})

    def present() -> bool:
        status = balancer.registry.GetModelStatus(rpb.GetModelStatusRequest(model_id=model_id))
        return any(n.node_id == holder.node_id and n.state == pb.MODEL_STATE_PRESENT for n in status.nodes)

    pulled = pull(holder.home, TOKEN, hub.url)
    assert pulled.returncode == 0, pulled.stderr
    holder.start()
    wait_online(balancer, holder, within=15)
    eventually(present, 10, "the model present on the holder")

    hub.clear_log()
    same = pull(tmp_path / "same", TOKEN, "http://127.0.0.1:9")  # no route to the origin: the peer or nothing
    assert same.returncode == 0, same.stderr
    assert (tmp_path / "same" / "models" / model_id / "g.gguf").read_bytes() == data
    assert hub.bytes_served() == 0

    # A wrong XLLM_AUTH_TOKEN does not matter: `xllm pull` asks the balancer for the fleet token
    # (Registry.GetFleetToken) before its first peer fetch, and the holder accepts that. (A peer that
    # refuses is skipped for the next source: tests/unit/test_node_token.py.)
    wrong = pull(tmp_path / "wrong", "not-the-fleet-token", "http://127.0.0.1:9")
    assert wrong.returncode == 0, wrong.stderr
    assert (tmp_path / "wrong" / "models" / model_id / "g.gguf").read_bytes() == data
    assert hub.bytes_served() == 0
    assert "does not match" not in wrong.stdout + wrong.stderr  # never refused
