"""The operator CLI (`llmlb models|nodes|keys`, and `xllm pull`) as a real process against a real balancer
and nodes."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.pb.llmlb.v1 import registry_pb2 as rpb
from devkit.fake_hub import FakeHub, gguf_blob
from devkit.model_files import CACHE, ModelFiles
from devkit.ports import free_port
from tests.fixtures.eventually import eventually
from tests.integration.conftest import ROOT, BalancerProcess, NodeProcess, llmlb, wait_online, xllm

pytestmark = pytest.mark.slow
NodeFactory = Callable[..., NodeProcess]


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_keys_are_created_listed_and_revoked_and_a_revoked_key_is_refused(
    balancer: BalancerProcess,
) -> None:
    at = ("--balancer", balancer.address)
    home = balancer.home  # the CLI finds the admin key the balancer wrote there

    made = llmlb("keys", "create", "--name", "frontend", "--scope", "api", "--json", *at, home=home)
    created = as_json(made)
    secret, key = created["secret"], created["key"]
    assert secret.startswith(key["prefix"]) and key["scopes"] == ["SCOPE_API"]

    human = llmlb("keys", "create", "--name", "worker", "--scope", "node", "--scope", "api", *at, home=home)
    assert human.returncode == 0, human.stderr
    assert "worker" in human.stdout and "api,node" in human.stdout
    printed_secret = human.stdout.strip().splitlines()[-1]  # the secret stands alone on the last line
    assert printed_secret.startswith("llmlb-")
    bound = llmlb(
        "keys", "create", "--name", "gpu-7", "--scope", "node", "--node-id", "gpu-7", *at, home=home
    )
    assert bound.returncode == 0 and "node gpu-7 only" in bound.stdout, bound.stderr

    listed = as_json(llmlb("keys", "list", "--json", *at, home=home))["keys"]
    by_name = {k["name"]: k for k in listed}
    assert {"admin", "frontend", "worker"} <= by_name.keys()
    assert by_name["worker"]["scopes"] == ["SCOPE_API", "SCOPE_NODE"]
    assert by_name["gpu-7"]["node_id"] == "gpu-7" and "node_id" not in by_name["worker"]
    assert all("secret" not in k for k in listed)
    table = llmlb("keys", "list", *at, home=home)
    assert table.stdout.splitlines()[0].split()[:4] == ["KEY", "NAME", "PREFIX", "SCOPES"]

    # An api key reads the catalogue but may not manage keys.
    with_key = {"LLMLB_API_KEY": secret}
    assert as_json(llmlb("models", "list", "--json", *at, home=home, env=with_key))["models"]
    one_line_error(llmlb("keys", "list", *at, home=home, env=with_key), "forbidden")

    revoked = llmlb("keys", "revoke", key["prefix"], *at, home=home)
    assert revoked.returncode == 0 and key["id"] in revoked.stdout, revoked.stderr
    after = {k["id"]: k for k in as_json(llmlb("keys", "list", "--json", *at, home=home))["keys"]}
    assert "revoked_at" in after[key["id"]]
    refused = llmlb("models", "list", "--api-key", secret, *at, home=home)
    one_line_error(refused, "unauthorized", "--api-key")
    one_line_error(llmlb("keys", "revoke", "key-nosuchkey", *at, home=home), "key_not_found")


def test_models_list_json_parses_and_the_table_names_every_model(balancer: BalancerProcess) -> None:
    at = ("--balancer", balancer.address)
    models = as_json(llmlb("models", "list", "--json", *at, home=balancer.home))["models"]
    ids = [m["id"] for m in models]
    assert ids == sorted(ids) and {"gemma-3-270m", "whisper-base"} <= set(ids)
    assert "CAPABILITY_TRANSCRIPTION" in next(m for m in models if m["id"] == "whisper-base")["capabilities"]
    table = llmlb("models", "list", *at, home=balancer.home).stdout.splitlines()
    assert table[0].split()[:3] == ["MODEL", "READY", "NODES"]
    assert any(line.startswith("gemma-3-270m ") and " no " in line for line in table[1:])
    one_line_error(llmlb("models", "status", "acme/nothing", *at, home=balancer.home), "model_not_found")


def test_an_unreachable_balancer_or_a_missing_key_is_a_one_line_error(
    balancer: BalancerProcess, tmp_path: Path
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    one_line_error(
        llmlb("models", "list", "--balancer", closed, home=tmp_path), "cannot reach the balancer", closed
    )
    one_line_error(
        llmlb("nodes", "list", home=tmp_path, env={"LLMLB_ADDR": closed}), "cannot reach the balancer"
    )
    # A home without admin-key and no key given: the balancer refuses, and the hint says what to set.
    one_line_error(
        llmlb("models", "list", "--balancer", balancer.address, home=tmp_path),
        "unauthorized",
        "LLMLB_API_KEY",
    )


def test_nodes_are_listed_drained_and_removed(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    at = ("--balancer", balancer.address)
    home = balancer.home
    node = node_factory(balancer, hub)

    def listed() -> dict[str, Any]:
        return {
            n["id"]: n for n in as_json(llmlb("nodes", "list", "--json", *at, home=home)).get("nodes", [])
        }

    def in_state(state: str) -> dict[str, Any]:
        def listed_so() -> dict[str, Any] | None:
            nodes = listed()
            return nodes if nodes.get(node.node_id, {}).get("state") == state else None

        return eventually(
            listed_so, 15, f"{state} in nodes list", every=0.2, describe=lambda: json.dumps(listed())[:3000]
        )

    nodes = in_state("NODE_STATE_ONLINE")
    assert nodes[node.node_id]["address"] == node.address
    table = llmlb("nodes", "list", *at, home=home).stdout
    assert node.node_id in table and "online" in table

    drained = llmlb("nodes", "drain", node.node_id, *at, home=home)
    assert drained.returncode == 0 and "draining" in drained.stdout, drained.stderr
    in_state("NODE_STATE_DRAINING")

    # A node that is gone for good (stopped, offline) is forgotten by `nodes rm`.
    node.stop()
    in_state("NODE_STATE_OFFLINE")
    removed = llmlb("nodes", "rm", node.node_id, "--json", *at, home=home)
    assert as_json(removed) == {"node_id": node.node_id}
    assert node.node_id not in listed()
    one_line_error(llmlb("nodes", "drain", node.node_id, *at, home=home), "node_not_found")
    one_line_error(llmlb("nodes", "rm", "no-such-node", *at, home=home), "node_not_found")


def test_pull_wait_ends_with_exit_0_once_the_node_has_the_model_from_the_shared_dir(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles
) -> None:
    at = ("--balancer", balancer.address)
    home = balancer.home
    node = node_factory(balancer, hub, "--shared-dir", str(CACHE))
    wait_online(balancer, node)  # a pull reaches only nodes the balancer lists online

    pulled = llmlb(
        "models", "pull", "gemma-3-270m", "--node", node.node_id, "--wait", "--timeout", "120", *at,
        home=home, timeout=150,
    )  # fmt: skip
    assert pulled.returncode == 0, (pulled.stdout, pulled.stderr, node.log()[-3000:])
    lines = pulled.stdout.splitlines()
    assert "\x1b" not in pulled.stdout  # not a terminal: plain lines, no redrawn bars
    assert any(node.node_id in line and "ready" in line and "100%" in line for line in lines), lines
    assert lines[-1] == "gemma-3-270m is ready"

    status = as_json(llmlb("models", "status", "gemma-3-270m", "--json", *at, home=home))
    assert status["status"] == "MODEL_STATE_READY"
    assert [(n["node_id"], n.get("ready", False)) for n in status["nodes"]] == [(node.node_id, True)]
    assert not list(node.models_dir.rglob("*.gguf"))  # used in place from the shared dir

    # On a terminal the same command draws a bar per node, redrawn in place.
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "balancer.cli", "models", "pull", "gemma-3-270m", "--wait", *at],
        cwd=ROOT,
        env={**os.environ, "LLMLB_HOME": str(home), "COLUMNS": "200"},
        stdout=secondary,
        stderr=subprocess.PIPE,
    )
    os.close(secondary)
    assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    drawn = b""
    while chunk := _read_pty(primary):
        drawn += chunk
    os.close(primary)
    assert b"\x1b[2K" in drawn and "━".encode() in drawn and b"100%" in drawn, drawn  # rich's bar
    assert drawn.rstrip().endswith(b"gemma-3-270m is ready"), drawn


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the writer has gone
        return b""


def test_pull_wait_ends_with_exit_1_when_the_node_cannot_fetch_the_model(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    at = ("--balancer", balancer.address)
    home = balancer.home
    hub.add_repo("acme/tampered", {"t.gguf": b"GGUF" + bytes(4096)})
    added = llmlb("models", "add", "acme/tampered", *at, home=home)
    assert added.returncode == 0, added.stderr
    hub.corrupt("acme/tampered", "t.gguf", b"GGUF" + b"\x01" * 4096)
    node = node_factory(balancer, hub)
    wait_online(balancer, node)

    pulled = llmlb("models", "pull", "acme/tampered", "--wait", "--timeout", "60", *at, home=home, timeout=90)
    one_line_error(pulled, "download_failed", "acme/tampered", node.node_id)
    lines = pulled.stdout.splitlines()
    assert "\x1b" not in pulled.stdout
    assert any(node.node_id in line and "failed" in line for line in lines[:-1])  # the node's state
    # The last line says what happened, as the error does.
    assert lines[-1].startswith(f"acme/tampered failed on node {node.node_id}: "), lines

    hub.add_repo("acme/slow", {"s.gguf": b"GGUF" + bytes(2 * 1024 * 1024)})
    assert llmlb("models", "add", "acme/slow", *at, home=home).returncode == 0
    hub.set_throttle(64 * 1024)  # about 30 s for the file: longer than the pull waits
    timed_out = llmlb(
        "models", "pull", "acme/slow", "--wait", "--timeout", "1", "--json", *at, home=home, timeout=60
    )
    assert timed_out.returncode == 1, timed_out.stderr
    report = json.loads(timed_out.stdout)
    assert report["ready"] is False and report["error"] == "timeout"


def test_xllm_pull_piped_prints_plain_progress_the_files_and_a_last_line_saying_what_happened(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    hub.add_repo("acme/plain", {"p.gguf": gguf_blob(2 * 1024 * 1024, seed=3)})
    model_id = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/plain")).id
    home = tmp_path / "puller"
    args = ("pull", "--balancer", balancer.address, "--models-dir", str(home / "models"))
    pulled = xllm(home, *args, model_id, "acme/nothing", env={"HF_ENDPOINT": hub.url}, timeout=60)
    assert pulled.returncode == 1, pulled.stderr  # one of the two could not be fetched
    assert "\x1b" not in pulled.stdout
    lines = pulled.stdout.splitlines()
    assert any(
        line.startswith(f"{model_id}  p.gguf") and "100%" in line and "fetched" in line for line in lines
    )
    assert any(line.split()[:3] == [model_id, "p.gguf", "download"] for line in lines)  # where it went
    assert lines[-1] == f"{model_id} is ready; acme/nothing failed (model_not_found)", lines
    assert "acme/nothing: error: model_not_found" in pulled.stderr
