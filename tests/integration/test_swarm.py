"""Drills for parallel ranged downloads and the swarm, on real node processes and the fake hub:
a node killed mid-swarm, a peer serving corrupt bytes, and an origin dropping connections mid-range.
Small files and small pieces keep each drill to seconds."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.pb.llmlb.v1 import registry_pb2 as rpb
from devkit.fake_hub import FakeHub, gguf_blob
from node.pieces import held_bytes
from tests.fixtures.eventually import eventually
from tests.integration.conftest import BalancerProcess, NodeProcess, wait_online, xllm
from tests.integration.test_node_worker import model_state_on, pull, register, start_online

MiB = 1024 * 1024
NodeFactory = Callable[..., NodeProcess]
PIECES = {"XLLM_DOWNLOAD_PIECE_MB": "1", "XLLM_DOWNLOAD_CONNECTIONS": "2"}


def events(log: str) -> list[dict[str, Any]]:
    found = []
    for line in log.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def done_line(log: str, model_id: str) -> dict[str, Any] | None:
    return next(
        (e for e in events(log) if e.get("event") == "download.done" and e.get("model_id") == model_id),
        None,
    )


def test_a_node_killed_mid_swarm_leaves_the_others_to_finish_from_another_source(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    data = gguf_blob(6 * MiB, seed=21)
    model_id = register(balancer, hub, "acme/swarmed", {"s.gguf": data})
    stays = node_factory(balancer, hub, **PIECES)
    leaves = node_factory(balancer, hub, **PIECES)
    wait_online(balancer, stays, leaves)
    hub.set_total_throttle(2 * MiB)  # about 3 s for the file: both are mid-way for a while
    balancer.registry.PullModel(
        rpb.PullModelRequest(model_id=model_id, node_ids=[stays.node_id, leaves.node_id])
    )
    part = leaves.models_dir / model_id / "s.gguf.partial"
    eventually(lambda: part.exists() and held_bytes(part) >= MiB, 30, "the leaver holding a piece")
    leaves.stop(signal.SIGKILL)
    eventually(
        lambda: done_line(stays.log(), model_id) is not None, 60, "the other node done", describe=stays.log
    )
    assert (stays.models_dir / model_id / "s.gguf").read_bytes() == data
    done = done_line(stays.log(), model_id)
    assert done is not None and sum(done["by_source"].values()) == len(data)
    assert done["by_source"].get("origin", 0) > 0  # what the leaver would have shared came from the origin


def test_a_peer_serving_corrupt_bytes_is_excluded_and_nothing_corrupt_is_kept(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory, tmp_path: Path
) -> None:
    data = gguf_blob(3 * MiB, seed=22)
    model_id = register(balancer, hub, "acme/liar", {"l.gguf": data})
    holder = node_factory(balancer, hub, start=False)
    pull(holder.home, balancer, hub, model_id)
    # Same size, mtime and inode, other bytes: the holder's verified-marker still vouches for it,
    # so it serves them as if they were the file (a disk or memory fault, or a malicious peer).
    path = holder.models_dir / model_id / "l.gguf"
    st = path.stat()
    with path.open("r+b") as fh:
        fh.seek(2 * MiB + 5)
        fh.write(b"\xff" * 64)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    start_online(holder, balancer)
    eventually(lambda: model_state_on(balancer, model_id, holder.node_id) != 0, 10, "the holder reports it")
    hub.clear_log()
    home = tmp_path / "fetcher"
    args = ["pull", "--balancer", balancer.address, "--models-dir", str(home / "models"), "--json", model_id]
    env = {"HF_ENDPOINT": hub.url, "XLLM_LOG_FORMAT": "json", **PIECES}
    done = xllm(home, *args, env=env)
    assert done.returncode == 0, done.stderr
    assert (home / "models" / model_id / "l.gguf").read_bytes() == data
    logged = events(done.stderr)
    mismatch = [e for e in logged if e.get("event") == "download.sha256_mismatch"]
    assert mismatch and mismatch[0]["excluded"] == [f"peer:{holder.node_id}"]
    finished = done_line(done.stderr, model_id)
    assert finished is not None and finished["by_source"].get("origin") == len(data)
    assert not list((home / "models").rglob("*.partial*"))


def test_an_origin_dropping_connections_mid_range_is_resumed_piece_by_piece(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(4 * MiB, seed=23)
    model_id = register(balancer, hub, "acme/dropping", {"d.gguf": data})
    hub.fail_after("d.gguf", 300 * 1024, times=3)  # three ranges cut short, each 300 KiB in
    home = tmp_path / "n"
    args = ["pull", "--balancer", balancer.address, "--models-dir", str(home / "models"), "--json", model_id]
    done = xllm(home, *args, env={"HF_ENDPOINT": hub.url, "XLLM_LOG_FORMAT": "json", **PIECES})
    assert done.returncode == 0, done.stderr
    assert (home / "models" / model_id / "d.gguf").read_bytes() == data
    # Each range resumed where its bytes stopped, none fetched again whole: at most what the client's
    # read buffer held when the connection dropped (256 KiB, common/hub.py) is asked for twice.
    assert len(data) <= hub.bytes_served("acme/dropping", "d.gguf") <= len(data) + 3 * 256 * 1024
    retried = [e for e in events(done.stderr) if e.get("event") == "download.attempt_failed"]
    assert len(retried) == 3
