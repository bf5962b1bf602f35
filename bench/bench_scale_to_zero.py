"""Scale to zero: the first answer from a deployment with no copy loaded vs from a warm copy, on two real
gemma-3-270m nodes, and the scheduler's estimated vs actual time to ready of each copy it placed.

One balancer (SQLite) and two ``xllm serve`` nodes on 127.0.0.1, the packaged GGUF on a shared dir used
in place (so a cold start is a load, not a download), the fake hub the only origin. gemma is deployed
``--min 0 --max 2`` with a short idle time (``LLMLB_SCALE_DOWN_IDLE``). Each round waits until the
deployment is at zero (no copy ready, none wanted), sends one streamed chat request (the cold start: it
waits while the scheduler, woken by it, places a copy and the node loads it), then the same number of
requests one after another on the copy now warm. Time to first answer is the time to the first streamed
content; every prompt is new, so no prefix cache helps the warm ones. The estimates and actual times
are the scheduler's own (``/v0/events``: "ready in X s (estimated Y s)").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common.pb.llmlb.v1 import types_pb2 as pb
from devkit import packaged_models
from devkit.fake_hub import FakeHub
from devkit.model_files import CACHE, catalogue_model
from devkit.node_process import NodeProcess
from devkit.replica_process import ReplicaProcess, create_key

MODEL = packaged_models.GEMMA
ROUNDS = 5
IDLE_S = 2.0  # LLMLB_SCALE_DOWN_IDLE for the run
MAX_TOKENS = 16
START_TIMEOUT_S = 180.0
ZERO_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0
_READY = re.compile(r"ready in ([0-9.]+) s \(estimated ([0-9.]+) s\)")


@dataclass(slots=True)
class Results:
    cold: list[float] = field(default_factory=list)  # time to first answer from zero
    cold_whole: list[float] = field(default_factory=list)  # the whole answer, from zero
    warm: list[float] = field(default_factory=list)
    warm_whole: list[float] = field(default_factory=list)
    placements: list[tuple[float, float]] = field(default_factory=list)  # (estimated, actual) seconds
    refused: list[str] = field(default_factory=list)  # any answer but 200


@dataclass(slots=True)
class Fleet:
    balancer: ReplicaProcess
    nodes: list[NodeProcess]
    admin: str
    key: str


async def _first_answer(client: httpx.AsyncClient, question: str, refused: list[str]) -> tuple[float, float]:
    """One streamed chat request: seconds to its first content and to its end."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    started = time.monotonic()
    first = 0.0
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            refused.append(f"{reply.status_code} {(await reply.aread())[:200]!r}")
            return float("nan"), float("nan")
        async for line in reply.aiter_lines():
            if first or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if choice.get("delta", {}).get("content"):
                    first = time.monotonic() - started
    return first or time.monotonic() - started, time.monotonic() - started


async def _deployment(admin: httpx.AsyncClient) -> dict[str, object]:
    reply = await admin.get(f"/v0/models/{MODEL}/deployment")
    reply.raise_for_status()
    found: dict[str, object] = reply.json()
    return found


async def _at_zero(admin: httpx.AsyncClient) -> None:
    """Until the deployment wants no copy and has none ready."""
    deadline = time.monotonic() + ZERO_TIMEOUT_S
    while True:
        d = await _deployment(admin)
        if d["desired_copies"] == 0 and d["ready_copies"] == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not at zero within {ZERO_TIMEOUT_S:.0f} s: {d}")
        await asyncio.sleep(0.2)


async def _online(admin: httpx.AsyncClient, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        reply = await admin.get("/v0/nodes")
        if reply.status_code == 200:
            nodes = reply.json().get("data", [])
            if sum(1 for n in nodes if n.get("state") == "online") >= count:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} nodes not online within {START_TIMEOUT_S:.0f} s: {reply.text[:300]}")
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def _fleet(root: Path, hub: FakeHub) -> AsyncIterator[Fleet]:
    env = {
        "HF_ENDPOINT": hub.url,
        "LLMLB_SCALE_DOWN_IDLE": str(IDLE_S),
        "LLMLB_SCHEDULE_INTERVAL": "0.5",
        "LLMLB_HEARTBEAT_INTERVAL_MS": "200",
        "LLMLB_HEARTBEAT_TIMEOUT_MS": "1500",
    }
    balancer = ReplicaProcess("b0", root / "b0", f"sqlite+aiosqlite:///{root / 'llmlb.db'}", env)
    nodes: list[NodeProcess] = []
    try:
        balancer.start()
        await balancer.wait_ready()
        admin = (root / "b0" / "admin-key").read_text().strip()
        node_key = await create_key(balancer, admin, "bench-nodes", pb.SCOPE_NODE)
        key = await create_key(balancer, admin, "bench-clients", pb.SCOPE_API)
        # Two nodes share this machine: one engine thread each, or their threads fight over the cores.
        node_env = {"XLLM_ENGINE_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
        nodes = [
            NodeProcess.start(root / f"node{i}", balancer.address, node_key, hub.url, node_env)
            for i in range(2)
        ]
        yield Fleet(balancer, nodes, admin, key)
    finally:
        for node in nodes:
            node.stop()
        balancer.stop()


async def _measure(fleet: Fleet) -> Results:
    results = Results()
    url = fleet.balancer.http_url
    async with (
        httpx.AsyncClient(
            base_url=url, timeout=10, headers={"Authorization": f"Bearer {fleet.admin}"}
        ) as admin,
        httpx.AsyncClient(
            base_url=url, timeout=REQUEST_TIMEOUT_S, headers={"Authorization": f"Bearer {fleet.key}"}
        ) as client,
    ):
        await _online(admin, len(fleet.nodes))
        reply = await admin.put(f"/v0/models/{MODEL}/deployment", json={"min_copies": 0, "max_copies": 2})
        reply.raise_for_status()
        # A first cold start, not counted: the first load on this machine pays for a cold page cache.
        await _first_answer(client, "Say hello.", results.refused)
        asked = 0
        for _ in range(ROUNDS):
            await _at_zero(admin)
            asked += 1
            first, whole = await _first_answer(client, f"Question {asked}: name a colour.", results.refused)
            results.cold.append(first)
            results.cold_whole.append(whole)
            for _ in range(ROUNDS):
                asked += 1
                first, whole = await _first_answer(
                    client, f"Question {asked}: name an animal.", results.refused
                )
                results.warm.append(first)
                results.warm_whole.append(whole)
            print(f"round: cold {results.cold[-1]:.2f} s, warm {results.warm[-1]:.2f} s", flush=True)
        events = (await admin.get("/v0/events")).json()["data"]
        for event in events:
            found = _READY.search(event["reason"]) if event["action"] == "ready" else None
            if found is not None and event["model_id"] == MODEL:
                results.placements.append((float(found.group(2)), float(found.group(1))))
    return results


async def run() -> str:
    await asyncio.to_thread(packaged_models.lay_out, catalogue_model(MODEL), CACHE)
    with tempfile.TemporaryDirectory(prefix="bench-zero-") as tmp, FakeHub() as hub:
        async with _fleet(Path(tmp), hub) as fleet:
            results = await _measure(fleet)
    return _report(results)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def _report(r: Results) -> str:
    ratio = statistics.median(r.cold) / statistics.median(r.warm) if r.cold and r.warm else float("nan")
    estimated = [e for e, _ in r.placements]
    actual = [a for _, a in r.placements]
    pairs = ", ".join(f"{e:.1f} / {a:.1f}" for e, a in r.placements) or "-"
    lines = [
        "## Scale to zero: first answer from zero vs from a warm copy (two gemma-3-270m nodes, CPU)",
        "",
        f"A `--min 0 --max 2` deployment idle for `LLMLB_SCALE_DOWN_IDLE={IDLE_S:g}` s goes to zero; "
        "the next request waits (no 503) while the scheduler, woken by it, places a copy and the node "
        "loads it (files on a shared dir: a load, no download). "
        f"{ROUNDS} rounds: one request from zero, then {ROUNDS} on the warm copy; streamed, "
        f"{MAX_TOKENS} tokens, a new prompt each.",
        "",
        "| | requests | first answer, median (s) | whole answer, median (s) |",
        "|---|---|---|---|",
        f"| from zero (cold start) | {len(r.cold)} | {_median(r.cold)} | {_median(r.cold_whole)} |",
        f"| warm copy | {len(r.warm)} | {_median(r.warm)} | {_median(r.warm_whole)} |",
        "",
        f"From zero the first answer took {ratio:.1f}x as long as from a warm copy; "
        f"requests refused: {len(r.refused)}{' (' + '; '.join(r.refused[:3]) + ')' if r.refused else ''}.",
        "",
        "The scheduler's time to ready of each copy it placed (the warm-up's included), estimated / "
        f"actual seconds: {pairs}. Median estimated {_median(estimated)} s, actual {_median(actual)} s "
        "(the actual time runs from the placement to the first heartbeat reporting the copy ready).",
    ]
    return "\n".join(lines) + "\n"
