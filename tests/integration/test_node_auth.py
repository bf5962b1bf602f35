"""A node started with ``XLLM_AUTH_TOKEN``, as real processes: its port serves only callers that present
the token, the balancer presents it for them, peers present their own, and no listing shows it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from common.channels import bearer_metadata
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
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


def test_a_peer_serves_a_node_with_the_fleets_token_and_a_wrong_token_falls_through_to_the_origin(
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

    wrong = pull(tmp_path / "wrong", "not-the-fleet-token", hub.url)
    assert wrong.returncode == 0, wrong.stderr
    assert (tmp_path / "wrong" / "models" / model_id / "g.gguf").read_bytes() == data
    assert hub.bytes_served() == len(data)  # the peer refused, so the origin served it all
    assert (wrong.stdout + wrong.stderr).count("does not match") == 1  # refused once, not retried
