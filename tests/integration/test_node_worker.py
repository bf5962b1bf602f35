"""The node worker with real processes on 127.0.0.1: a balancer, `xllm` nodes and the fake hub.

A model is "present" on a node when its files are; these tests follow the bytes: where they come
from (hub requests), where they land (the models dir, never the shared dir or the balancer's disk),
and what the balancer's fleet view says.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing

from common.config import load_node_config
from common.errors import ErrorCode, LlmlbError
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from devkit.fake_hub import FakeHub, gguf_blob
from node.pieces import held_bytes
from node.process import assemble
from tests.fixtures.eventually import eventually
from tests.integration.conftest import (
    DIRECT_TOKEN,
    BalancerProcess,
    NodeProcess,
    pending_commands,
    xllm,
    xllm_start,
)

MiB = 1024 * 1024
NodeFactory = Callable[..., NodeProcess]


def register(balancer: BalancerProcess, hub: FakeHub, repo: str, files: dict[str, bytes]) -> str:
    hub.add_repo(repo, files)
    return balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id=repo)).id


def files_under(folder: Path) -> dict[str, int]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def pull(home: Path, balancer: BalancerProcess, hub: FakeHub, *models: str, **flags: str) -> dict[str, Any]:
    args = ["pull", "--balancer", balancer.address, "--models-dir", str(home / "models"), "--json", *models]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}", value]
    done = xllm(home, *args, env={"HF_ENDPOINT": hub.url})
    assert done.stdout, done.stderr
    results = {r["model_id"]: r for r in json.loads(done.stdout)}
    return results


def node_state(balancer: BalancerProcess, node_id: str) -> int:
    for node in balancer.registry.ListNodes(rpb.ListNodesRequest()).nodes:
        if node.id == node_id:
            return node.state
    return pb.NODE_STATE_UNSPECIFIED


def start_online(node: NodeProcess, balancer: BalancerProcess) -> str:
    """Starts the node and waits until the balancer lists it online; returns its id."""
    node.start()
    eventually(lambda: (node.home / "node-id").exists(), 10, "a saved node id")
    eventually(lambda: node_state(balancer, node.node_id) == pb.NODE_STATE_ONLINE, 10, "online")
    return node.node_id


def model_state_on(balancer: BalancerProcess, model_id: str, node_id: str) -> int:
    status = balancer.registry.GetModelStatus(rpb.GetModelStatusRequest(model_id=model_id))
    return next((n.state for n in status.nodes if n.node_id == node_id), pb.MODEL_STATE_ABSENT)


# -- downloads ---------------------------------------------------------------------------------


def test_a_model_nowhere_local_is_downloaded_verified_and_then_served_locally(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(3 * MiB)
    model_id = register(balancer, hub, "acme/tiny", {"tiny.gguf": data, "README.md": b"# tiny\n"})
    home = tmp_path / "n"
    result = pull(home, balancer, hub, model_id)[model_id]
    path = home / "models" / model_id / "tiny.gguf"
    assert result["files"] == {"tiny.gguf": {"path": str(path), "from": "download"}}  # README not needed
    assert path.read_bytes() == data
    assert not list((home / "models").rglob("*.partial"))
    assert hub.bytes_served("acme/tiny", "tiny.gguf") == len(data)

    hub.clear_log()
    again = pull(home, balancer, hub, model_id)[model_id]
    assert again["files"]["tiny.gguf"]["from"] == "local"
    assert hub.bytes_served() == 0  # the verified-marker spares a re-hash and the origin a request


def test_download_through_the_balancer_proxy_writes_nothing_to_the_balancers_disk(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(2 * MiB, seed=1)
    model_id = register(balancer, hub, "acme/proxied", {"p.gguf": data})
    before = {k: v for k, v in files_under(balancer.home).items() if not k.startswith("llmlb.db")}
    home = tmp_path / "n"
    # The node's own route to the origin is a closed port: only the proxy can deliver.
    args = ["pull", "--balancer", balancer.address, "--models-dir", str(home / "models"), "--json"]
    done = xllm(
        home, *args, "--download-via", "balancer", model_id, env={"HF_ENDPOINT": "http://127.0.0.1:9"}
    )
    assert done.returncode == 0, done.stderr
    assert (home / "models" / model_id / "p.gguf").read_bytes() == data
    after = {k: v for k, v in files_under(balancer.home).items() if not k.startswith("llmlb.db")}
    assert set(after) - {"balancer.log"} == set(before) - {"balancer.log"}
    assert all(size < len(data) for size in after.values())
    assert hub.bytes_served("acme/proxied", "p.gguf") == len(data)


async def test_twenty_concurrent_resolutions_make_one_download(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(4 * MiB, seed=2)
    model_id = register(balancer, hub, "acme/popular", {"pop.gguf": data})
    hub.set_throttle(8 * MiB)  # slow enough that all twenty arrive while it runs
    config = load_node_config(
        models_dir=tmp_path / "models",
        balancer=balancer.address,
        api_key=balancer.node_key,
        home=tmp_path,
        env={"HF_ENDPOINT": hub.url},
    )
    parts = assemble(config, address="")
    try:
        results = await asyncio.gather(*(parts.resolver.resolve(model_id) for _ in range(20)))
    finally:
        await parts.close()
    assert {str(r.paths["pop.gguf"]) for r in results} == {str(tmp_path / "models" / model_id / "pop.gguf")}
    body_requests = [r for r in hub.requests if r.is_file_body and r.filename == "pop.gguf"]
    assert len(body_requests) == 1
    assert hub.bytes_served("acme/popular", "pop.gguf") == len(data)


def holds_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (Linux ``/proc``)."""
    target = str(path.resolve())
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == target:
                return True
        except OSError:
            continue
    return False


def test_two_node_processes_on_one_models_dir_share_one_download(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(4 * MiB, seed=3)
    model_id = register(balancer, hub, "acme/shared-lock", {"s.gguf": data})
    hub.set_throttle(256 * 1024)  # 16 s for the file: the second process surely arrives mid-transfer
    models = tmp_path / "models"
    final = models / model_id / "s.gguf"
    partial = models / model_id / "s.gguf.partial"
    lock = models / ".locks" / model_id / "s.gguf.lock"
    args = ("pull", "--balancer", balancer.address, "--models-dir", str(models), model_id)
    first = xllm_start(tmp_path / "a", *args, env={"HF_ENDPOINT": hub.url})
    second = None
    try:
        eventually(lambda: partial.exists() and held_bytes(partial) > 0, 30, "the first process downloading")
        second = xllm_start(tmp_path / "b", *args, env={"HF_ENDPOINT": hub.url})
        eventually(lambda: holds_open(second.pid, lock), 30, "the second process at the file's lock")
        # Checked after: the first still holds the lock (it publishes the file before letting go), so
        # the second was waiting on the download in progress, not arriving after it ended.
        assert not final.exists()
        assert hub.bytes_served("acme/shared-lock", "s.gguf") < len(data)
        hub.set_throttle(None)
        _, first_log = first.communicate(timeout=120)
        _, second_log = second.communicate(timeout=120)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert first.returncode == 0, first_log
    assert second.returncode == 0, second_log
    assert final.read_bytes() == data
    body_requests = [r for r in hub.requests if r.is_file_body and r.filename == "s.gguf"]
    assert len(body_requests) == 1
    assert hub.bytes_served("acme/shared-lock", "s.gguf") == len(data)  # one transfer, not two
    assert "download.start" in first_log and "download.start" not in second_log


def test_a_node_killed_mid_download_resumes_on_its_next_start(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory, tmp_path: Path
) -> None:
    data = gguf_blob(6 * MiB, seed=4)
    model_id = register(balancer, hub, "acme/big", {"big.gguf": data})
    hub.set_throttle(2 * MiB)
    node = node_factory(balancer, hub, start=False)
    partial = node.models_dir / model_id / "big.gguf.partial"
    args = ("pull", "--balancer", balancer.address, "--models-dir", str(node.models_dir), model_id)
    puller = xllm_start(node.home, *args, env={"HF_ENDPOINT": hub.url})
    try:
        eventually(lambda: partial.exists() and held_bytes(partial) > MiB, 30, "a partial file")
    finally:
        puller.send_signal(signal.SIGKILL)
        puller.wait()
    kept = held_bytes(partial)
    assert 0 < kept < len(data)
    hub.clear_log()
    hub.set_throttle(3 * MiB)

    node_id = start_online(node, balancer)  # no request needed: it resumes what it left unfinished
    final = node.models_dir / model_id / "big.gguf"

    def reported_progress() -> bool:  # the balancer sees the download advance, not just its end
        status = balancer.registry.GetModelStatus(rpb.GetModelStatusRequest(model_id=model_id))
        mine = [n for n in status.nodes if n.node_id == node_id]
        return bool(mine) and mine[0].state == pb.MODEL_STATE_DOWNLOADING and kept < mine[0].downloaded_bytes

    eventually(reported_progress, 10, "download progress at the balancer")
    eventually(final.exists, 30, "the resumed download")
    eventually(lambda: model_state_on(balancer, model_id, node_id) == pb.MODEL_STATE_PRESENT, 5, "present")
    assert final.read_bytes() == data
    fetched = hub.bytes_served("acme/big", "big.gguf")
    assert fetched < len(data)
    assert fetched == len(data) - kept
    ranges = [
        {k.lower(): v for k, v in r.headers.items()}.get("range") for r in hub.requests if r.is_file_body
    ]
    assert ranges == [f"bytes={kept}-{len(data) - 1}"]  # one explicit range: what was missing


def test_a_corrupted_cached_file_is_rejected_and_fetched_again(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(MiB, seed=5)
    model_id = register(balancer, hub, "acme/fragile", {"f.gguf": data})
    home = tmp_path / "n"
    pull(home, balancer, hub, model_id)
    path = home / "models" / model_id / "f.gguf"
    with path.open("r+b") as fh:  # same size, flipped bytes: only the sha256 can tell
        fh.seek(1000)
        fh.write(b"\x00" * 16)
    hub.clear_log()
    result = pull(home, balancer, hub, model_id)[model_id]
    assert result["files"]["f.gguf"]["from"] == "download"
    assert path.read_bytes() == data
    assert hub.bytes_served("acme/fragile", "f.gguf") == len(data)


def test_bytes_that_fail_the_sha256_never_become_the_file(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(MiB, seed=6)
    model_id = register(balancer, hub, "acme/tampered", {"t.gguf": data})
    hub.corrupt("acme/tampered", "t.gguf", gguf_blob(MiB, seed=99))
    home = tmp_path / "n"
    result = pull(home, balancer, hub, model_id)[model_id]
    assert result["error"] == ErrorCode.DOWNLOAD_FAILED.value
    assert "sha256" in str(result["message"])
    assert files_under(home / "models" / model_id).keys() <= {".llmlb/manifest.json"}

    hub.clear_faults()
    assert pull(home, balancer, hub, model_id)[model_id]["files"]  # the next attempt starts clean
    assert (home / "models" / model_id / "t.gguf").read_bytes() == data


def test_a_connection_dropped_mid_body_is_resumed_within_the_same_download(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(2 * MiB, seed=7)
    model_id = register(balancer, hub, "acme/flaky", {"k.gguf": data})
    hub.fail_after("k.gguf", MiB // 2, times=2)
    home = tmp_path / "n"
    assert pull(home, balancer, hub, model_id)[model_id]["files"]
    assert (home / "models" / model_id / "k.gguf").read_bytes() == data
    assert hub.bytes_served("acme/flaky", "k.gguf") == len(data)  # no byte fetched twice


# -- the shared dir ----------------------------------------------------------------------------


async def test_a_model_on_the_shared_dir_is_used_in_place_and_changes_are_seen(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(2 * MiB, seed=8)
    model_id = register(balancer, hub, "acme/nfs", {"n.gguf": data})
    share = tmp_path / "share"
    (share / model_id).mkdir(parents=True)
    (share / model_id / "n.gguf").write_bytes(data)
    models = tmp_path / "models"
    config = load_node_config(
        models_dir=models,
        shared_dir=share,
        balancer=balancer.address,
        api_key=balancer.node_key,
        home=tmp_path,
        env={"HF_ENDPOINT": hub.url},
    )
    parts = assemble(config, address="")
    try:
        resolved = await parts.resolver.resolve(model_id)
        assert resolved.paths["n.gguf"] == share / model_id / "n.gguf"
        assert resolved.sources["n.gguf"] == "shared"
        assert files_under(models / model_id) == {}  # not one byte copied
        assert hub.bytes_served() == 0
    finally:
        await parts.close()

    # A restarted node trusts what it verified before: the share's gigabytes are not hashed again.
    parts = assemble(config, address="")
    try:
        with structlog.testing.capture_logs() as logs:
            again = await parts.resolver.resolve(model_id)
        assert again.sources["n.gguf"] == "shared"
        assert not [e for e in logs if e["event"] == "file.hashing"], logs

        # The share's copy changes (same size, other bytes): the next resolution sees it no longer
        # matches the manifest and fetches the real file instead of trusting what it saw before.
        (share / model_id / "n.gguf").write_bytes(gguf_blob(2 * MiB, seed=80))
        changed = await parts.resolver.resolve(model_id)
        assert changed.sources["n.gguf"] == "download"
        assert (models / model_id / "n.gguf").read_bytes() == data
    finally:
        await parts.close()


def test_a_missing_shared_dir_falls_through_to_a_download(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(MiB, seed=9)
    model_id = register(balancer, hub, "acme/gone", {"g.gguf": data})
    home = tmp_path / "n"
    result = pull(home, balancer, hub, model_id, shared_dir=str(tmp_path / "unmounted"))[model_id]
    assert result["files"]["g.gguf"]["from"] == "download"


# -- bad requests ------------------------------------------------------------------------------


async def test_an_unknown_model_fails_within_a_second_and_a_traversal_id_touches_nothing(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    config = load_node_config(
        models_dir=models, balancer=balancer.address, api_key=balancer.node_key, home=tmp_path, env={}
    )
    parts = assemble(config, address="")
    try:
        started = time.monotonic()
        with pytest.raises(LlmlbError) as unknown:
            await parts.resolver.resolve("acme/no-such-model")
        assert time.monotonic() - started < 1.0
        assert unknown.value.code is ErrorCode.MODEL_NOT_FOUND

        for bad in ("../../etc/passwd", "acme/../../x", "/abs/path", "a" * 300):
            with pytest.raises(LlmlbError) as invalid:
                await parts.resolver.resolve(bad)
            assert invalid.value.code is ErrorCode.INVALID_MODEL_ID
    finally:
        await parts.close()
    assert files_under(models) == {}
    assert not (tmp_path / "etc").exists()
    assert hub.requests == []


def test_a_node_serves_only_manifest_files_it_holds(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    data = gguf_blob(MiB, seed=10)
    model_id = register(balancer, hub, "acme/held", {"h.gguf": data})
    node = node_factory(balancer, hub, start=False, XLLM_AUTH_TOKEN=DIRECT_TOKEN)
    pull(node.home, balancer, hub, model_id)
    node.start()
    with node.direct_channel() as channel:
        stub = mgrpc.ManifestStub(channel)
        body = b"".join(
            c.data for c in stub.ReadBlob(mpb.ReadBlobRequest(model_id=model_id, filename="h.gguf"))
        )
        assert body == data
        part = b"".join(
            c.data
            for c in stub.ReadBlob(mpb.ReadBlobRequest(model_id=model_id, filename="h.gguf", offset=10))
        )
        assert part == data[10:]
        for filename, code in (
            ("../../../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
            ("other.gguf", grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.ReadBlob(mpb.ReadBlobRequest(model_id=model_id, filename=filename)))
            assert err.value.code() == code
        with pytest.raises(grpc.RpcError) as bad_id:
            list(stub.ReadBlob(mpb.ReadBlobRequest(model_id="../x", filename="h.gguf")))
        assert bad_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the balancer link -------------------------------------------------------------------------


def test_a_node_registers_reports_what_it_holds_and_keeps_its_id(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    data = gguf_blob(MiB, seed=11)
    model_id = register(balancer, hub, "acme/held2", {"h.gguf": data})
    node = node_factory(balancer, hub, start=False)
    pull(node.home, balancer, hub, model_id)
    node_id = start_online(node, balancer)
    eventually(lambda: model_state_on(balancer, model_id, node_id) == pb.MODEL_STATE_PRESENT, 10, "present")
    listed = next(n for n in balancer.registry.ListNodes(rpb.ListNodesRequest()).nodes if n.id == node_id)
    assert listed.address == node.address
    assert pb.BACKEND_CPU in listed.backends
    assert listed.version == metadata.version("llmlb")
    assert {"llama.cpp", "faster-whisper", "onnxruntime"} <= set(listed.runtimes)
    assert listed.load.memory_total_mb > 0  # the host's memory, for placement; no GPU on this machine
    status = balancer.registry.GetModelStatus(rpb.GetModelStatusRequest(model_id=model_id))
    assert status.status == pb.MODEL_STATE_PRESENT and status.total_bytes == len(data)

    node.stop()
    node.start()
    eventually(lambda: node_state(balancer, node_id) == pb.NODE_STATE_ONLINE, 10, "online again")
    assert node.node_id == node_id


def test_killing_a_node_takes_it_out_of_the_fleet_within_a_second(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    node = node_factory(balancer, hub, start=False)
    node_id = start_online(node, balancer)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait()
    node.proc = None
    killed = time.monotonic()
    eventually(lambda: node_state(balancer, node_id) == pb.NODE_STATE_OFFLINE, 1.0, "offline", every=0.02)
    assert time.monotonic() - killed < 1.0


def test_a_node_reconnects_by_itself_after_the_balancer_restarts(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    node = node_factory(balancer, hub, start=False)
    node_id = start_online(node, balancer)
    port = balancer.port
    balancer.restart()
    assert balancer.port == port
    eventually(lambda: node_state(balancer, node_id) == pb.NODE_STATE_ONLINE, 15, "online after the restart")


def test_a_delete_reaches_an_online_node_within_a_second_and_the_shared_copy_stays(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory, tmp_path: Path
) -> None:
    local_data, shared_data = gguf_blob(MiB, seed=12), gguf_blob(MiB, seed=13)
    local_id = register(balancer, hub, "acme/local", {"l.gguf": local_data})
    shared_id = register(balancer, hub, "acme/onshare", {"s.gguf": shared_data})
    share = tmp_path / "share"
    (share / shared_id).mkdir(parents=True)
    (share / shared_id / "s.gguf").write_bytes(shared_data)
    node = node_factory(balancer, hub, "--shared-dir", str(share), start=False)
    pull(node.home, balancer, hub, local_id, shared_id, shared_dir=str(share))
    local_file = node.models_dir / local_id / "l.gguf"
    assert local_file.exists()
    start_online(node, balancer)

    started = time.monotonic()
    balancer.registry.DeleteModel(rpb.DeleteModelRequest(model_id=local_id))
    balancer.registry.DeleteModel(rpb.DeleteModelRequest(model_id=shared_id))
    eventually(lambda: not (node.models_dir / local_id).exists(), 1.0, "the local copy deleted")
    assert time.monotonic() - started < 1.0
    # Both deletes carried out and acknowledged: the balancer's durable queue for the node is empty.
    eventually(lambda: not pending_commands(balancer, node.node_id), 5.0, "both commands acknowledged")
    assert (share / shared_id / "s.gguf").read_bytes() == shared_data  # never the shared dir
    assert node.models_dir.exists()  # only the model's own folder went


def test_an_offline_node_deletes_its_copy_when_it_reconnects(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory
) -> None:
    data = gguf_blob(MiB, seed=14)
    model_id = register(balancer, hub, "acme/stale", {"st.gguf": data})
    node = node_factory(balancer, hub, start=False)
    pull(node.home, balancer, hub, model_id)
    node_id = start_online(node, balancer)
    node.stop()
    eventually(lambda: node_state(balancer, node_id) == pb.NODE_STATE_OFFLINE, 5, "offline")

    reply = balancer.registry.DeleteModel(rpb.DeleteModelRequest(model_id=model_id))
    assert reply.nodes_notified == 1
    assert (node.models_dir / model_id / "st.gguf").exists()  # nobody told it yet
    balancer.restart()  # the command is durable: it survives the balancer too
    node.start()
    eventually(lambda: not (node.models_dir / model_id).exists(), 10, "the copy deleted on reconnect")


def test_a_node_fetches_from_a_peer_that_holds_the_model_before_the_origin(
    balancer: BalancerProcess, hub: FakeHub, node_factory: NodeFactory, tmp_path: Path
) -> None:
    data = gguf_blob(2 * MiB, seed=15)
    model_id = register(balancer, hub, "acme/peered", {"pe.gguf": data})
    # Nothing configured: `xllm pull` never registers, so it asks the balancer for the fleet token,
    # which the serving holder accepts.
    holder = node_factory(balancer, hub, start=False)
    pull(holder.home, balancer, hub, model_id)
    start_online(holder, balancer)
    eventually(
        lambda: model_state_on(balancer, model_id, holder.node_id) == pb.MODEL_STATE_PRESENT, 10, "present"
    )
    hub.clear_log()
    home = tmp_path / "second"
    args = ["pull", "--balancer", balancer.address, "--models-dir", str(home / "models"), "--json", model_id]
    # The origin is reachable and would serve the file: the peer is asked first all the same.
    done = xllm(home, *args, env={"HF_ENDPOINT": hub.url, "XLLM_LOG_FORMAT": "json"})
    assert done.returncode == 0, done.stderr
    assert (home / "models" / model_id / "pe.gguf").read_bytes() == data
    assert [r for r in hub.requests if r.is_file_body] == []
    assert hub.bytes_served() == 0
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    finished = [(e["filename"], e["by_source"]) for e in events if e.get("event") == "download.done"]
    assert finished == [("pe.gguf", {f"peer:{holder.node_id}": len(data)})]
    started = next(e for e in events if e.get("event") == "download.start")
    assert started["sources"][f"peer:{holder.node_id}"] == "bulk"  # the holder's bulk port, not ReadBlob


def test_xllm_models_lists_what_the_models_dir_holds(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    model_id = register(balancer, hub, "acme/listed", {"x.gguf": gguf_blob(1000, seed=16)})
    home = tmp_path / "n"
    pull(home, balancer, hub, model_id)
    done = xllm(home, "models", "--models-dir", str(home / "models"), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["model_id"], r["total_bytes"], r["partial_bytes"]) for r in rows] == [(model_id, 1000, 0)]
    assert os.path.isdir(rows[0]["path"])


# -- the origin's rules, as a node meets them ---------------------------------------------------


def test_a_node_reads_a_private_repo_only_with_the_hf_token_in_its_env_file(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(MiB, seed=21)
    hub.add_repo("acme/private", {"p.gguf": data}, private=True)
    balancer = balancer_factory(hub, token=True)  # the balancer may read it; the node must say who it is
    model_id = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/private")).id
    home = tmp_path / "node"
    refused = pull(home, balancer, hub, model_id)[model_id]
    # download_failed, the node's fault and not the caller's: the router tries another node with it.
    assert refused["error"] == ErrorCode.DOWNLOAD_FAILED.value and "HF_TOKEN" in refused["message"]
    assert {r.status for r in hub.requests if r.filename == "p.gguf"} == {401}  # refused, nothing sent
    assert not list((home / "models").rglob("*.partial"))

    (home / ".env").write_text(f"HF_TOKEN={hub.token}\n")  # ~/.llmlb/.env, as an operator would
    fetched = pull(home, balancer, hub, model_id)[model_id]
    assert fetched["files"]["p.gguf"]["from"] == "download", fetched
    assert (home / "models" / model_id / "p.gguf").read_bytes() == data


def test_a_node_refuses_an_origin_outside_its_allowlist_before_any_request(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    model_id = register(balancer, hub, "acme/elsewhere", {"e.gguf": gguf_blob(MiB, seed=22)})
    hub.clear_log()
    home = tmp_path / "node"
    args = ["pull", "--balancer", balancer.address, "--models-dir", str(home / "models"), "--json", model_id]
    env = {"HF_ENDPOINT": hub.url, "XLLM_ALLOWED_ORIGINS": "https://huggingface.co"}
    done = xllm(home, *args, env=env)
    [result] = json.loads(done.stdout)
    assert done.returncode == 1 and result["error"] == ErrorCode.DOWNLOAD_FAILED.value, result
    assert "not allowed on this node" in result["message"] and "XLLM_ALLOWED_ORIGINS" in result["message"]
    assert hub.bytes_served() == 0 and not hub.requests
    assert not [f for f in files_under(home / "models" / model_id) if not f.startswith(".llmlb/")]
