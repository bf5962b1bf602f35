"""A replica killed under full load: two replicas, two real gemma nodes, 200 clients (``BENCH_DRILL_CLIENTS``)
for 60 s; replica A is SIGKILLed at 20 s and started again at 40 s. Counted: what was lost, answered
twice or answered wrongly, answered, refused fast or timed out, how fast A's nodes were held by B, how
fast A answered again after its restart.

The full-scale run of ``tests/integration/test_replica_drills.py``'s kill drill (16 clients there).
Process layout, all on 127.0.0.1: a throw-away PostgreSQL (``devkit.postgres``), the fake hub as the
only origin (nothing may leave the machine), two ``llmlb serve`` processes on one database with auth
on (replicas A and B, ``devkit.replica_process``), and two ``xllm serve`` nodes that know both
(``XLLM_BALANCER=<A>,<B>``, so both attach to A first) holding the packaged gemma-3-270m on a shared
dir used in place. The clients run in this process (``devkit.replica_clients``): each has a home
replica and a door (HTTP ``/v1/completions`` or gRPC ``Inference.Complete``), asks for 1 to 3 tokens
with a unique request id, and sends a request whose connection is refused or lost again, with the same
id, to the other replica.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from common.channels import bearer_metadata
from common.errors import LlmlbError
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import CHANNEL_OPTIONS
from devkit import packaged_models
from devkit.fake_hub import FakeHub
from devkit.load_clients import GRPC, HTTP, TIMEOUT, LoadClients, summary
from devkit.model_files import CACHE, catalogue_model
from devkit.node_process import NodeProcess
from devkit.postgres import PostgresServer, find_bin_dir
from devkit.proc_cpu import CpuMeter
from devkit.replica_clients import RETRIABLE, Ask, ReplicaClients
from devkit.replica_process import ReplicaProcess, create_key, replica_pair

MODEL = packaged_models.GEMMA
PROMPT = "One, two, three, four,"  # gemma continues it with "five"
TOKENS = (1, 2, 3)  # max_tokens, cycled request by request
# Spread evenly over both doors and both home replicas; fewer for a shorter run on a busy machine.
CLIENTS = int(os.environ.get("BENCH_DRILL_CLIENTS", "200"))
RUN_S = 60.0
KILL_AT_S = 20.0
RESTART_AT_S = 40.0
WINDOW_S = 10.0
GOAL_HELD_S = 2.0  # A's nodes held by B within this long after the kill
POLL_S = 0.05  # ListNodes on B while waiting for it to hold A's nodes
HOLD_TIMEOUT_S = 15.0
START_TIMEOUT_S = 120.0  # two nodes loading gemma on a busy 2-core machine
DRAIN_TIMEOUT_S = 90.0  # after the run, for the requests still in flight (each has a 60 s deadline)
FAST_REFUSAL_S = 0.1  # a shed request (429 / RESOURCE_EXHAUSTED) counts as refused fast within this


async def _until(check: Callable[[], Awaitable[bool]], within: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {within:.0f} s: {what}")
        await asyncio.sleep(every)


async def _holders(replica: ReplicaProcess, key: str, call_s: float = 2.0) -> dict[str, str]:
    """Which replica holds each online node's session, as ``replica`` lists it; {} if it does not answer."""
    async with grpc.aio.insecure_channel(replica.address, options=CHANNEL_OPTIONS) as channel:
        try:
            reply = await rgrpc.RegistryStub(channel).ListNodes(
                rpb.ListNodesRequest(), timeout=call_s, metadata=bearer_metadata(key)
            )
        except grpc.aio.AioRpcError:
            return {}
    return {n.id: n.replica for n in reply.nodes if n.state == pb.NODE_STATE_ONLINE}


# -- the drill ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Drill:
    asks: list[Ask] = field(default_factory=list)
    retries: int = 0
    attempts: str = ""  # every attempt by door and result
    began: float = 0.0  # when the clients started (time.monotonic())
    killed: float = 0.0
    held_s: float | None = None  # from the kill until B listed both nodes held by B
    restarted: float = 0.0
    ready_s: float | None = None  # from the restart until A's /readyz answered
    back_s: float | None = None  # from the restart until A's first answer came back
    cpu: dict[str, float] = field(default_factory=dict)
    warnings: dict[str, dict[str, int]] = field(default_factory=dict)
    late: int = 0  # requests still unfinished when the drain timed out


async def _warm_up(a: ReplicaProcess, key: str, nodes: int) -> None:
    """Until both nodes have answered once (each loads gemma on its first request)."""
    answered_by: set[str] = set()
    async with LoadClients(a.http_url, a.address, key, connections=8) as clients:
        deadline = time.monotonic() + START_TIMEOUT_S
        n = 0
        while len(answered_by) < nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(answered_by)} node(s) answered in {START_TIMEOUT_S:.0f} s")
            batch = [clients.grpc_complete(f"warm-{n + i}", MODEL, PROMPT, max_tokens=1) for i in range(4)]
            n += len(batch)
            answered_by |= {o.node_id for o in await asyncio.gather(*batch) if o.answered}


async def _drill(server: PostgresServer, root: Path, hub: FakeHub, postmaster: int) -> _Drill:
    result = _Drill()
    async with replica_pair(server, root, {"HF_ENDPOINT": hub.url}) as (a, b, admin):
        node_key = await create_key(a, admin, "drill-nodes", pb.SCOPE_NODE)
        key = await create_key(a, admin, "drill-clients", pb.SCOPE_API)
        nodes = [
            NodeProcess.start(root / f"node{i}", f"{a.address},{b.address}", node_key, hub.url)
            for i in range(2)
        ]
        clients = ReplicaClients(
            [(a.http_url, a.address), (b.http_url, b.address)],
            key,
            MODEL,
            PROMPT,
            max_tokens=TOKENS,
            connections=CLIENTS // 2,  # every client on one replica while the other is down
        )
        try:
            ids: set[str] = set()

            async def both_online() -> bool:
                nonlocal ids
                ids = {n.node_id for n in nodes}
                held = [await _holders(r, admin) for r in (a, b)]
                return "" not in ids and all(ids <= set(h) for h in held)

            await _until(both_online, START_TIMEOUT_S, "both nodes online on both replicas")
            held_by_a = set((await _holders(a, admin)).values())
            await _warm_up(a, key, len(nodes))

            assert a.pid is not None and b.pid is not None  # both started above
            pids: dict[str, int | None] = {"replica A": a.pid, "replica B": b.pid}
            pids |= {f"node {i + 1}": n.proc.pid for i, n in enumerate(nodes)}
            pids["clients (this process)"] = os.getpid()
            meter = CpuMeter(pids, postmaster)
            stop = asyncio.Event()
            per = CLIENTS // 4
            meter.start()
            result.began = time.monotonic()
            senders = [
                asyncio.create_task(clients.keep_asking(door, home, f"{door}-{home}-{i}", stop))
                for door in (HTTP, GRPC)
                for home in (0, 1)
                for i in range(per)
            ]

            await asyncio.sleep(KILL_AT_S)
            meter.swap("replica A", None)  # its CPU so far is read before the kill
            result.killed = time.monotonic()
            await asyncio.to_thread(a.stop, signal.SIGKILL)

            async def held_by_b() -> bool:
                held = await _holders(b, admin)
                return set(held) == ids and not set(held.values()) & held_by_a

            try:
                await _until(held_by_b, HOLD_TIMEOUT_S, "A's nodes held by B", every=POLL_S)
                result.held_s = time.monotonic() - result.killed
            except TimeoutError:
                pass  # reported as a miss

            await asyncio.sleep(max(0.0, result.began + RESTART_AT_S - time.monotonic()))
            result.restarted = time.monotonic()
            a.start()
            meter.swap("replica A", a.pid)
            await a.wait_ready()
            result.ready_s = time.monotonic() - result.restarted

            await asyncio.sleep(max(0.0, result.began + RUN_S - time.monotonic()))
            result.cpu = meter.shares()
            stop.set()
            _done, pending = await asyncio.wait(senders, timeout=DRAIN_TIMEOUT_S)
            result.late = len(pending)
            for task in pending:
                task.cancel()
            back = [o.started + o.seconds for o in clients.answers_on(0, result.restarted)]
            result.back_s = min(back) - result.restarted if back else None
            result.asks = clients.asks
            result.retries = clients.retries()
            result.attempts = summary([o for ask in clients.asks for o in ask.attempts])
            result.warnings = {r.name: dict(r.warnings().most_common(4)) for r in (a, b)}
        finally:
            await clients.close()
            for node in nodes:
                node.stop()
    return result


async def run() -> str:
    """Runs the drill on a throw-away PostgreSQL; returns the markdown section."""
    title = f"## Replica killed under load: {CLIENTS} clients, two replicas, two gemma nodes"
    bin_dir = find_bin_dir()
    if bin_dir is None:
        return f"{title}\n\nNot measured: PostgreSQL's binaries are not installed.\n"
    try:  # written once into the model cache, then used in place by both nodes
        await asyncio.to_thread(packaged_models.lay_out, catalogue_model(MODEL), CACHE)
    except LlmlbError as exc:
        return f"{title}\n\nNot measured: {exc.message}\n"
    busy = os.getloadavg()[0]
    server = PostgresServer(bin_dir)
    server.start()
    try:
        postmaster = int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        with tempfile.TemporaryDirectory() as tmp, FakeHub() as hub:
            drill = await _drill(server, Path(tmp), hub, postmaster)
    finally:
        server.stop()
    return _report(title, drill, busy)


# -- the report ----------------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _seconds(value: float | None, missed: str) -> str:
    return f"{value:.2f} s" if value is not None else missed


def _report(title: str, d: _Drill, busy: float) -> str:
    answered = [(ask, answer) for ask in d.asks if (answer := ask.answer) is not None]
    lost = len(d.asks) - len(answered)
    twice = sum(1 for ask in d.asks if sum(o.answered for o in ask.attempts) > 1)
    wrong = sum(1 for _, answer in answered if not answer.matched)
    off_text = sum(1 for _, answer in answered if "five" not in answer.text.lower())
    timeouts = sum(1 for ask in d.asks for o in ask.attempts if o.error == TIMEOUT)
    attempts = [o for ask in d.asks for o in ask.attempts]
    refused = [o for o in attempts if o.error.endswith("queue_full")]
    fast = sum(1 for o in refused if o.seconds < FAST_REFUSAL_S)
    timed_out = sum(1 for o in attempts if o.error == TIMEOUT or o.error.endswith(" timeout"))
    latency = [o.started + o.seconds - ask.attempts[0].started for ask, o in answered]
    retried = [s for (ask, _), s in zip(answered, latency, strict=True) if len(ask.attempts) > 1]
    windows = int(RUN_S // WINDOW_S)
    done = [0] * (windows + 1)  # the last: answers that came back after the run, while it drained
    for _, o in answered:
        done[min(windows, int((o.started + o.seconds - d.began) // WINDOW_S))] += 1
    sent = [0] * windows
    for ask in d.asks:
        sent[min(windows - 1, int((ask.attempts[0].started - d.began) // WINDOW_S))] += 1
    causes = Counter(_cause(ask.attempts[-1].error) for ask in d.asks if ask.answer is None)
    hit = [ask for ask in d.asks if any(o.error in RETRIABLE for o in ask.attempts)]
    saved = sum(1 for ask in hit if ask.answer is not None)
    others = d.cpu.get("whole machine", 0.0) - sum(v for k, v in d.cpu.items() if k != "whole machine")
    lines = [
        title,
        "",
        f"Everything on 127.0.0.1 of one machine with {os.cpu_count()} CPU(s), shared with other work (the "
        f"1-minute load average was {busy:.1f} when the run started): a throw-away PostgreSQL (no fsync), "
        "two `llmlb serve` replicas (A, B) on one database with auth on and default limits, two `xllm "
        f"serve` nodes holding the packaged {MODEL} on a shared dir and knowing both replicas (both attach "
        f"to A first), and {CLIENTS} clients in the bench's process, {CLIENTS // 4} per door (HTTP "
        "`/v1/completions`, gRPC `Inference.Complete`) and home replica, each sending one request after "
        f"another ({'/'.join(map(str, TOKENS))} tokens in turn, a unique request id each) for {RUN_S:.0f} s "
        "after both nodes had answered once. A request whose connection is refused or lost is sent again, "
        "with the same id, to the other replica, and so is one refused with `queue_full`, after its "
        "`Retry-After` and within its 60 s deadline (`devkit.replica_clients`, as in "
        f"`tests/integration/test_replica_drills.py`). A is SIGKILLed at {KILL_AT_S:.0f} s and started "
        f"again at {RESTART_AT_S:.0f} s. On 2 shared cores the two nodes, both replicas, PostgreSQL and "
        "the clients all compete for CPU, so the rates and latencies are this machine's, not a fleet's.",
        "",
        f"- requests sent: {len(d.asks):,}; answered: {len(answered):,}; retried on the other replica: "
        f"{d.retries:,} attempts",
        f"- **lost** (no answer): {lost} (goal 0: {_verdict(lost == 0)})"
        + (f"; {d.late} still unanswered {DRAIN_TIMEOUT_S:.0f} s after the run" if d.late else "")
        + "".join(f"; {n} {cause}" for cause, n in causes.most_common()),
        f"- requests that met a refused or lost connection (the kill, or A down): {len(hit)}; answered "
        f"after a retry: {saved}; lost: {len(hit) - saved}",
        f"- **answered twice**: {twice} (goal 0: {_verdict(twice == 0)})",
        f"- wrong answers (carrying another request's id): {wrong} (goal 0: {_verdict(wrong == 0)}); "
        f'answers not continuing the count with "five": {off_text}',
        f"- attempts that ran past their deadline: {timeouts}; every attempt by door and result: "
        f"`{d.attempts}`",
        f"- attempts answered: {sum(o.answered for o in attempts):,}; refused fast (429 / RESOURCE_EXHAUSTED "
        f"`queue_full` in < {FAST_REFUSAL_S * 1000:.0f} ms, the client then waiting its `Retry-After`): "
        f"{fast:,}; refused later (left the queue once its wait no longer fit): {len(refused) - fast:,}; "
        f"**timed out** (the client's deadline, or 504 / DEADLINE_EXCEEDED): {timed_out:,} (goal 0: "
        f"{_verdict(timed_out == 0)})",
        f"- A's nodes held by B (`ListNodes`' `replica`, polled on B every {POLL_S * 1000:.0f} ms) "
        f"{_seconds(d.held_s, f'**not within {HOLD_TIMEOUT_S:.0f} s**')} after the kill (goal ≤ "
        f"{GOAL_HELD_S:.0f} s: {_verdict(d.held_s is not None and d.held_s <= GOAL_HELD_S)})",
        f"- A after its restart: ready (`/readyz`) after {_seconds(d.ready_s, '**never**')}, its first "
        f"answer {_seconds(d.back_s, '**never**')} after the restart",
    ]
    rate = sum(done[:windows]) / RUN_S
    if rate:
        lines.append(
            f"- capacity: the two nodes answered {rate:.1f} requests/s here (goodput), so {CLIENTS} clients "
            f"would each wait about {CLIENTS / rate:.0f} s in the replicas' queues; the replicas refuse at "
            "once (429 with `Retry-After`) a request whose expected wait exceeds `LLMLB_MAX_QUEUE_WAIT` or "
            "its deadline, instead of letting it time out, kill or no kill: on this machine that is most "
            "of what is not answered"
        )
    if latency:
        lines.append(
            f"- latency of an answered request, first attempt to answer: p50 {_pct(latency, 0.5):.2f} s, "
            f"p99 {_pct(latency, 0.99):.2f} s"
            + (
                f"; of the {len(retried)} retried: p50 {_pct(retried, 0.5):.2f} s, "
                f"p99 {_pct(retried, 0.99):.2f} s"
                if retried
                else ""
            )
        )
    for name, events in d.warnings.items():
        if events:
            top = ", ".join(f"`{event}` ({count})" for event, count in events.items())
            lines.append(f"- replica {name} logged (most often): {top}")
    rows = [
        f"| {i * WINDOW_S:.0f}-{(i + 1) * WINDOW_S:.0f} s{_event(i)} | {n / WINDOW_S:.1f} | "
        f"{sent[i] / WINDOW_S:.1f} |"
        for i, n in enumerate(done[:windows])
    ]
    lines += [
        "",
        "| window | answers/s (by when they came back) | requests/s sent |",
        "|---|---|---|",
        *rows,
        f"| after the run (in flight at {RUN_S:.0f} s) | {done[windows]} answers | |",
        "",
        f"| process | CPU over the {RUN_S:.0f} s, share of one core |",
        "|---|---|",
        *(f"| {name} | {share:.0%} |" for name, share in d.cpu.items()),
        f"| of which other work on the machine | {max(0.0, others):.0%} |",
        "",
        "Replica A's CPU is both of its processes' (until the kill, and from the restart); `whole "
        "machine` is every core's busy time (from /proc/stat), other people's work included.",
        "",
    ]
    return "\n".join(lines)


def _cause(error: str) -> str:
    """Why a request was lost, from its last attempt's error."""
    if error == TIMEOUT or error.endswith(" timeout"):
        return "timed out waiting (the balancer's 30 s queue timeout, or the client's 60 s deadline)"
    if error.endswith("queue_full"):
        return "refused: the expected wait did not fit (429 / RESOURCE_EXHAUSTED with `Retry-After`)"
    if error in RETRIABLE:
        return "refused or cut off on every replica until the client's deadline"
    return f"ended with `{error}`"


def _event(window: int) -> str:
    starts, ends = window * WINDOW_S, (window + 1) * WINDOW_S
    marks = [
        what for at, what in ((KILL_AT_S, "A killed"), (RESTART_AT_S, "A restarted")) if starts <= at < ends
    ]
    return f" ({', '.join(marks)})" if marks else ""
