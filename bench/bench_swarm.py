"""One origin fetch for the fleet: four nodes asked for the same new model at once, from an origin
whose link is throttled, beside one node fetching alone.

Everything runs on 127.0.0.1: the fake hub is the origin, with one shared pace for all its
connections (``set_total_throttle``: a link of that speed); the balancer runs in this process and
four ``xllm serve`` processes are the fleet. ``Registry.PullModel`` asks the nodes for the model;
each node's ``download.done`` log line says when it finished and how many bytes came from where.
The origin's own count of bytes sent says how often it was read. ``BENCH_SWARM_MIB`` (default
1024) and ``BENCH_SWARM_MBPS`` (default 100) pick the file size and the origin's speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc.aio

from balancer.catalog import RegisterRequest
from balancer.server import start as start_balancer
from bench.bench_transfer import ROOT, _vm_hwm_kb
from common.config import load_balancer_config
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from devkit.fake_hub import FakeHub

SIZE_MIB = int(os.environ.get("BENCH_SWARM_MIB", "1024"))
ORIGIN_MBPS = int(os.environ.get("BENCH_SWARM_MBPS", "100"))
NODES = 4


class ServeNode:
    """An ``xllm serve`` process whose JSON log goes to a file this bench reads."""

    def __init__(self, home: Path, balancer: str, hub_url: str) -> None:
        self.home = home
        self.balancer = balancer
        self.hub_url = hub_url
        self.log = home / "node.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.peak_kb = 0

    async def start(self) -> None:
        self.home.mkdir(parents=True)
        env = {
            **os.environ,
            "LLMLB_HOME": str(self.home),
            "HF_ENDPOINT": self.hub_url,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "XLLM_LOG_FORMAT": "json",
            "XLLM_LOG_LEVEL": "info",
            "XLLM_DOWNLOAD_TIMEOUT": "600",
        }
        args = ["-m", "node.cli", "serve", "--balancer", self.balancer]
        args += ["--models-dir", str(self.home / "models"), "--grpc-listen", "127.0.0.1:0"]
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=out
            )

    def sample(self) -> None:
        if self.proc is not None:
            self.peak_kb = max(self.peak_kb, _vm_hwm_kb(Path(f"/proc/{self.proc.pid}/status")))

    def done(self, model_id: str) -> dict[str, object] | None:
        """The node's ``download.done`` line for ``model_id``, once written."""
        for line in self.log.read_text(errors="replace").splitlines():
            if '"download.done"' in line and model_id in line:
                found: dict[str, object] = json.loads(line)
                return found
        return None

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


async def _node_ids(address: str, count: int) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rgrpc.RegistryStub(channel)
        for _ in range(600):
            nodes = await stub.ListNodes(rpb.ListNodesRequest())
            online = [n.id for n in nodes.nodes if n.state == pb.NODE_STATE_ONLINE]
            if len(online) >= count:
                return online
            await asyncio.sleep(0.1)
    raise RuntimeError(f"fewer than {count} nodes came online")


async def _pull(
    address: str, model_id: str, nodes: list[ServeNode], node_ids: list[str]
) -> tuple[float, list[float], list[dict[str, object]]]:
    """Asks ``node_ids`` for the model at once; waits for each node's ``download.done``."""
    async with grpc.aio.insecure_channel(address) as channel:
        started = time.perf_counter()
        await rgrpc.RegistryStub(channel).PullModel(
            rpb.PullModelRequest(model_id=model_id, node_ids=node_ids)
        )
    finished: dict[int, float] = {}
    lines: dict[int, dict[str, object]] = {}
    deadline = time.monotonic() + 900
    while len(finished) < len(nodes):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{model_id}: only {len(finished)} of {len(nodes)} nodes finished")
        for i, node in enumerate(nodes):
            node.sample()
            if i not in finished and (line := node.done(model_id)) is not None:
                finished[i] = time.perf_counter() - started
                lines[i] = line
        await asyncio.sleep(0.05)
    return (
        max(finished.values()),
        [finished[i] for i in range(len(nodes))],
        [lines[i] for i in range(len(nodes))],
    )


async def run() -> str:
    size = SIZE_MIB * 1024 * 1024
    rate = ORIGIN_MBPS * 1_000_000
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name, FakeHub() as hub:
        tmp = Path(tmp_name)
        (tmp / "balancer").mkdir()
        config = load_balancer_config(
            home=tmp / "balancer",
            grpc_listen="127.0.0.1:0",
            http_listen="",
            hf_endpoint=hub.url,
            env={"LLMLB_HOME": str(tmp / "balancer")},
            log_level="warning",
            auth=False,
        )
        balancer = await start_balancer(config)
        address = f"127.0.0.1:{balancer.port}"
        nodes = [ServeNode(tmp / f"node{i}", address, hub.url) for i in range(NODES)]
        try:
            data = os.urandom(size)
            hub.add_repo("bench/swarm-alone", {"w.gguf": data})
            hub.add_repo("bench/swarm-four", {"w.gguf": data})
            del data
            alone = (await balancer.catalog.register(RegisterRequest(repo_id="bench/swarm-alone"))).id
            four = (await balancer.catalog.register(RegisterRequest(repo_id="bench/swarm-four"))).id
            for node in nodes:
                await node.start()
            ids = await _node_ids(address, NODES)
            by_id = {json.loads(line)["node_id"]: n for n in nodes for line in _listening(n)}
            ordered = [by_id[i] for i in ids]
            hub.set_total_throttle(rate)

            hub.clear_log()
            solo_s, _, solo_lines = await _pull(address, alone, ordered[:1], ids[:1])
            solo_served = hub.bytes_served("bench/swarm-alone") / size
            rows.append(
                f"| one node alone | 1 | {solo_s:.1f} | {solo_served:.2f}x | "
                f"{_sources(solo_lines[0])} | 1.00 |"
            )

            hub.clear_log()
            last_s, each_s, lines = await _pull(address, four, ordered, ids)
            served = hub.bytes_served("bench/swarm-four") / size
            for i, (seconds, line) in enumerate(zip(each_s, lines, strict=True)):
                rows.append(
                    f"| swarm node {i + 1} of {NODES} | {NODES} | {seconds:.1f} | "
                    f"{served:.2f}x (all) | {_sources(line)} | {seconds / solo_s:.2f} |"
                )
            rss = ", ".join(f"{n.peak_kb / 1024:.0f}" for n in ordered)
        finally:
            for node in nodes:
                await node.stop()
            await balancer.stop(grace=0)
    met_origin = "met" if served <= 1.1 else "MISSED"
    met_time = "met" if last_s <= 1.5 * solo_s else "MISSED"
    return "\n".join(
        [
            "## One origin fetch for the fleet: four nodes at once vs one alone",
            "",
            f"A {SIZE_MIB} MiB file on the fake hub, its link throttled to {ORIGIN_MBPS} MB/s shared by all",
            f"connections; {NODES} `xllm serve` nodes on 127.0.0.1 asked at once (`Registry.PullModel`),",
            "after one node fetched a same-size model alone. Seconds are from the ask to the node's",
            "`download.done` line (verified, fsynced, renamed). `origin read` is the bytes the hub sent",
            "over the file's size; `from` is the node's bytes per source (MiB).",
            "",
            "| fetch | nodes | seconds | origin read | from | vs alone |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"- origin read {served:.2f}x the file for {NODES} nodes (goal <= 1.1x: {met_origin})",
            f"- last node done in {last_s:.1f} s vs {solo_s:.1f} s alone, {last_s / solo_s:.2f}x "
            f"(goal <= 1.5x: {met_time})",
            f"- peak RSS of each node process (MiB, VmHWM, whole `xllm serve`): {rss}",
            "",
        ]
    )


def _listening(node: ServeNode) -> list[str]:
    return [
        line for line in node.log.read_text(errors="replace").splitlines() if '"balancer.registered"' in line
    ]


def _sources(line: dict[str, object]) -> str:
    by_source = line.get("by_source")
    if not isinstance(by_source, dict):
        return "-"
    return ", ".join(f"{name} {int(n) / 2**20:.0f}" for name, n in sorted(by_source.items()))
