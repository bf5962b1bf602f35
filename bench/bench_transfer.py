"""Blob transfer: a node fetching a model file from the origin, the balancer's proxy and a peer node,
beside a plain local file copy, with the peak RSS of the fetching process.

Everything runs on 127.0.0.1: the origin is the fake Hugging Face hub, the balancer runs in this
process, and each fetch is a real ``xllm pull`` process (a fresh interpreter, so its peak RSS is its
own). The transfer time is the node's own (its ``download.done`` log line: first byte asked for to
verified file renamed into place); the rest of the process's wall time is start-up (imports,
manifest lookup) and is reported beside it. The same fetch of a 16x larger file shows whether memory
stays flat with the file's size. ``BENCH_TRANSFER_MIB`` (e.g. ``64,1024``) picks the sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc.aio

from balancer.catalog import RegisterRequest
from balancer.server import start as start_balancer
from common.config import load_balancer_config
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from devkit.fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[1]
SIZES_MIB = tuple(int(v) for v in os.environ.get("BENCH_TRANSFER_MIB", "64,1024").split(","))


async def _pull(
    home: Path, balancer: str, model_id: str, env: dict[str, str], *extra: str
) -> tuple[float, tuple[float, float], int]:
    """Runs ``xllm pull``: its wall time, the node's transfer and fsync times, its peak RSS (kB)."""
    full_env = {
        **os.environ,
        **env,
        "LLMLB_HOME": str(home),
        "XLLM_LOG_LEVEL": "info",
        "XLLM_LOG_FORMAT": "json",
    }
    args = ["-m", "node.cli", "pull", "--balancer", balancer, "--models-dir", str(home / "models"), *extra]
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        model_id,
        cwd=ROOT,
        env=full_env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    stderr = asyncio.create_task(proc.stderr.read())  # drained as it comes, so the pipe never fills
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.returncode is None:
        peak = max(peak, _vm_hwm_kb(status))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.05)
    elapsed = time.perf_counter() - started
    text = (await stderr).decode()
    if proc.returncode != 0:
        raise RuntimeError(f"xllm pull failed: {text[-2000:]}")
    return elapsed, _transfer_seconds(text), peak


def _transfer_seconds(log_text: str) -> tuple[float, float]:
    """``seconds`` and ``sync_s`` of the node's ``download.done`` line(s), summed over its files."""
    total, sync = 0.0, 0.0
    for line in log_text.splitlines():
        if '"download.done"' in line:
            done = json.loads(line)
            total += float(done["seconds"])
            sync += float(done.get("sync_s", 0.0))
    if total <= 0:
        raise RuntimeError(f"no download.done line in the node's log: {log_text[-2000:]}")
    return total, sync


def _vm_hwm_kb(status: Path) -> int:
    """Peak resident memory of a live process, from /proc (0 once it has gone)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def _wait_present(balancer: str, model_id: str) -> None:
    async with grpc.aio.insecure_channel(balancer) as channel:
        stub = rgrpc.RegistryStub(channel)
        for _ in range(600):
            status = await stub.GetModelStatus(rpb.GetModelStatusRequest(model_id=model_id))
            if status.status == pb.MODEL_STATE_PRESENT:
                return
            await asyncio.sleep(0.05)
    raise RuntimeError("the holder node never reported the model present")


async def _serve_node(home: Path, balancer: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    full_env = {**os.environ, **env, "LLMLB_HOME": str(home), "XLLM_LOG_LEVEL": "warning"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "node.cli",
        "serve",
        "--balancer",
        balancer,
        "--models-dir",
        str(home / "models"),
        "--grpc-listen",
        "127.0.0.1:0",
        cwd=ROOT,
        env=full_env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return proc


def _row(name: str, size_mb: int, wall: float, times: tuple[float, float], rss_kb: int, base: float) -> str:
    transfer, sync = times
    rss = f"{rss_kb / 1024:.0f}" if rss_kb else "-"
    start_up = f"{wall - transfer:.2f}" if wall > transfer else "-"
    net = transfer - sync
    return (
        f"| {name} | {size_mb} | {transfer:.2f} | {size_mb * 1.048576 / transfer:.0f} | {sync:.2f} | "
        f"{size_mb * 1.048576 / net:.0f} | {base / transfer:.2f} | {start_up} | {wall:.2f} | {rss} |"
    )


async def run() -> str:
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name, FakeHub() as hub:
        tmp = Path(tmp_name)
        config = load_balancer_config(
            home=tmp / "balancer",
            grpc_listen="127.0.0.1:0",
            http_listen="",
            hf_endpoint=hub.url,
            env={"LLMLB_HOME": str(tmp / "balancer")},
            log_level="warning",
            auth=False,  # this measures moving bytes; keys are checked once per call, not per chunk
        )
        (tmp / "balancer").mkdir()
        balancer = await start_balancer(config)
        address = f"127.0.0.1:{balancer.port}"
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}
        closed = {"HF_ENDPOINT": "http://127.0.0.1:9"}
        try:
            for size_mb in SIZES_MIB:
                data = os.urandom(size_mb * 1024 * 1024)
                repo = f"bench/blob-{size_mb}"
                hub.add_repo(repo, {"w.gguf": data})
                model_id = (await balancer.catalog.register(RegisterRequest(repo_id=repo))).id
                source = tmp / f"src-{size_mb}.bin"
                source.write_bytes(data)
                del data
                started = time.perf_counter()
                shutil.copyfile(source, tmp / f"copy-{size_mb}.bin")
                base = time.perf_counter() - started
                rows.append(_row("local file copy (shutil)", size_mb, base, (base, 0.0), 0, base))

                w, t, rss = await _pull(tmp / f"origin-{size_mb}", address, model_id, env)
                rows.append(_row("node <- origin (hub, HTTP)", size_mb, w, t, rss, base))
                w, t, rss = await _pull(
                    tmp / f"proxy-{size_mb}", address, model_id, closed, "--download-via", "balancer"
                )
                rows.append(_row("node <- balancer proxy", size_mb, w, t, rss, base))

                # A serving node that holds the file, found through the balancer, then a fresh node.
                holder = await _serve_node(tmp / f"origin-{size_mb}", address, env)
                try:
                    await _wait_present(address, model_id)
                    w, t, rss = await _pull(tmp / f"peer-{size_mb}", address, model_id, closed)
                    rows.append(_row("node <- peer node", size_mb, w, t, rss, base))
                finally:
                    holder.terminate()
                    await holder.wait()
        finally:
            await balancer.stop(grace=0)
    return "\n".join(
        [
            "## Blob transfer: origin, balancer proxy and peer vs a local file copy",
            "",
            "Each fetch is a fresh `xllm pull` process on 127.0.0.1 writing a verified file. `transfer s`",
            "is the node's own download time (its `download.done` line: first byte asked for to verified",
            "file renamed); `start-up s` is the rest of the process's wall time (interpreter, imports,",
            "manifest lookup). MB/s is of the transfer (10^6 bytes); `vs copy` is the local copy's time",
            "divided by the transfer's (1.00 = as fast as `shutil.copyfile`). Peak RSS is the fetching",
            "process's VmHWM: it should not grow with the file (goal: within 20 %). `of which fsync` is",
            "the flush to disk before the rename (the disk's share); `MB/s before fsync` is the rest.",
            "The local copy is not flushed. The balancer runs",
            "with auth off (`LLMLB_AUTH=false`): this measures moving bytes, not checking keys.",
            "",
            "| path | MiB | transfer s | MB/s | of which fsync s | MB/s before fsync | vs copy | start-up s "
            "| process wall s | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
