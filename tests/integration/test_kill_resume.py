"""A node killed with SIGKILL mid-download resumes every piece: the origin serves the file about once.

Real processes on 127.0.0.1: a balancer, ``xllm pull`` (the node's downloader, without the serving
around it) and the fake hub as the origin, throttled per connection so the file's four pieces (the
default size and connections) are each part-way when the kill lands. The kill comes when a share of
the file's bytes is on disk (the ``.partial``'s allocated blocks, whatever its sidecar says), and the
cost is counted where the origin sees it: the fake hub's bytes served, over the killed run and the
resumed one together.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
from pathlib import Path

import pytest

from common.pb.llmlb.v1 import registry_pb2 as rpb
from devkit.fake_hub import FakeHub, RequestRecord
from tests.fixtures.eventually import eventually
from tests.integration.conftest import BalancerProcess, xllm, xllm_start

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
PIECE = 32 * MiB  # the default XLLM_DOWNLOAD_PIECE_MB
SIZE = 4 * PIECE  # four pieces, one per default connection
PER_CONNECTION = 6 * MiB  # bytes/s: the whole file in about 5 s, 1.3 s to the first kill
MOST_SERVED = 1.05  # origin bytes over the file's size, killed run and resumed run together


def on_disk(partial: Path) -> int:
    """Bytes the ``.partial``'s allocated blocks hold: what a kill leaves written."""
    try:
        return partial.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def range_starts(requests: list[RequestRecord]) -> list[int]:
    """Where each file body asked for starts (0 for a whole-file request)."""
    bodies = [r for r in requests if r.is_file_body]
    return [int((r.range or "bytes=0-").removeprefix("bytes=").split("-")[0]) for r in bodies]


def kill_when_on_disk(puller: subprocess.Popen[str], partial: Path, nbytes: int) -> None:
    """SIGKILLs ``puller`` once ``nbytes`` of ``partial`` are on disk."""
    try:
        eventually(lambda: on_disk(partial) >= nbytes, 30, f"{nbytes} bytes on disk", every=0.01)
    finally:
        puller.send_signal(signal.SIGKILL)
        puller.communicate()  # reaps it and closes its pipes


def test_a_node_killed_with_sigkill_at_a_quarter_half_or_three_quarters_resumes_every_piece(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = b"GGUF" + random.Random(10).randbytes(SIZE - 4)  # stored, never run
    sha256 = hashlib.sha256(data).hexdigest()
    hub.add_repo("acme/killed", {"w.gguf": data})
    model_id = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/killed")).id
    del data
    served: dict[int, float] = {}
    for percent in (25, 50, 75):
        home = tmp_path / f"at-{percent}"  # a node of its own for each kill
        folder = home / "models" / model_id
        args = ("pull", "--balancer", balancer.address, "--models-dir", str(home / "models"), model_id)
        env = {"HF_ENDPOINT": hub.url}

        hub.clear_log()
        hub.set_throttle(PER_CONNECTION)
        kill_when_on_disk(xllm_start(home, *args, env=env), folder / "w.gguf.partial", SIZE * percent // 100)
        assert not (folder / "w.gguf").exists(), "the download finished before the kill"

        hub.set_throttle(None)
        killed_run = len(hub.requests)
        resumed = xllm(home, *args, env=env)
        assert resumed.returncode == 0, resumed.stderr
        starts = range_starts(hub.requests[killed_run:])
        assert len(starts) == 4 and all(start % PIECE for start in starts), starts  # every piece part-way
        with (folder / "w.gguf").open("rb") as fh:
            assert hashlib.file_digest(fh, "sha256").hexdigest() == sha256
        served[percent] = hub.bytes_served("acme/killed", "w.gguf") / SIZE

    print("origin bytes over the file's size, by kill point:", served)
    assert all(ratio <= MOST_SERVED for ratio in served.values()), served
