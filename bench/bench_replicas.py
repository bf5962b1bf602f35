"""Two balancer replicas on one PostgreSQL: what 1,000 nodes cost them, how fast a delete reaches every
node, and routed requests/s through one replica vs two, side by side in one run.

Longer than ~400 lines because it is one measurement with its process layout: the replicas' start,
the simulators', echo nodes' and load generator's processes, the two parts and their report are each
used only here, and reading them together is what shows what was measured. The simulated nodes
themselves are ``devkit.node_swarm``.

Process layout, all on 127.0.0.1: a throw-away PostgreSQL (``devkit.postgres``), two ``llmlb serve``
processes on one database with auth on (replica A and B), and helper processes started with ``spawn``.

1. Fleet: two simulator processes (one per replica, 500 nodes each, so that a simulator falling
   behind is not mistaken for a slow balancer; their CPU and lag are reported) register their nodes
   (``Registry.RegisterNode`` with an address nothing listens on: no request is routed in this part)
   and hold a ``NodeSession`` stream per node, with a heartbeat every second (the default)
   carrying two models. Measured: how long until both replicas list all 1,000 online; each replica's
   CPU over a steady window of heartbeats; the time from a ``DeleteModel`` call on A until the last of
   the 1,000 nodes received its delete command (half of them are held by B, so it crosses the
   database). Goals: under half a core per replica; the delete at every node within 2 s.
2. Routing: both replicas restarted on a fresh database; two echo nodes (``devkit.echo_node``, real
   gRPC servers, in one process; one attached to each replica) and a load generator sending 1-token
   gRPC ``Complete`` calls with a fixed number in flight, first all to A, then spread over A and B, in
   alternating rounds. Each process's CPU is read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from common.channels import bearer_metadata
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import CHANNEL_OPTIONS
from common.types import Capability
from devkit.node_swarm import NodeSwarm
from devkit.postgres import PostgresServer, find_bin_dir
from devkit.proc_cpu import CpuMeter
from devkit.replica_process import ReplicaProcess, replica_pair

NODES = 1000
SIMULATORS = 2  # one per replica: each holds NODES // SIMULATORS sessions
SIM_CHANNELS = 8  # connections per simulator, so no one HTTP/2 connection carries 500 streams
REGISTER_IN_FLIGHT = 32
FLEET_MODELS = ("whisper-base", "piper-en-us-joe-medium")  # catalogue models every node reports ready
DELETED = "whisper-base"
HEARTBEAT_S = 1.0  # the balancer's default interval (left as it is), which it hands each node
ONLINE_TIMEOUT_S = 90.0
POLL_S = 2.0  # between ListNodes calls while nodes come online: each lists all 1,000, which costs
CALL_TIMEOUT_S = 60.0  # for the bench's own calls to a replica (one saturated by 500 nodes is slow)
SETTLE_S = 5.0  # after all are online, before the steady window
STEADY_S = 25.0
DELETE_TIMEOUT_S = 30.0
GOAL_CPU = 0.5  # of one core, per replica, while 500 nodes beat on each
GOAL_DELETE_S = 2.0
ROUTED_MODEL = "gemma-3-270m"
IN_FLIGHT = 64
LOAD_S = 6.0
ROUNDS = 2
START_TIMEOUT_S = 60.0
# Every call in flight may go to one node: this measures routing, not the wait queue.
_REPLICA_ENV = {"LLMLB_NODE_MAX_INFLIGHT": str(IN_FLIGHT * 2)}


async def _online(replica: ReplicaProcess, key: str) -> int:
    """How many nodes the replica lists online; 0 while it does not answer within the timeout."""
    async with grpc.aio.insecure_channel(replica.address, options=CHANNEL_OPTIONS) as channel:
        try:
            reply = await rgrpc.RegistryStub(channel).ListNodes(
                rpb.ListNodesRequest(), timeout=CALL_TIMEOUT_S, metadata=bearer_metadata(key)
            )
        except grpc.aio.AioRpcError:
            return 0
    return sum(1 for node in reply.nodes if node.state == pb.NODE_STATE_ONLINE)


# -- the simulators' processes -------------------------------------------------------------------------


def _sim_main(conn: Connection, address: str, key: str, node_ids: list[str]) -> None:
    asyncio.run(_simulate(conn, address, key, node_ids))


async def _simulate(conn: Connection, address: str, key: str, node_ids: list[str]) -> None:
    from common.logs import configure_logging

    configure_logging("console", "warning")
    sim = NodeSwarm(
        address,
        key,
        node_ids,
        models=FLEET_MODELS,
        capabilities=(Capability.TRANSCRIPTION, Capability.SPEECH),
        connections=SIM_CHANNELS,
        register_in_flight=REGISTER_IN_FLIGHT,
    )
    loop = asyncio.get_running_loop()
    opening: asyncio.Task[list[str]] | None = None
    opened_s: float | None = None

    async def open_all() -> list[str]:
        nonlocal opened_s
        started = time.monotonic()
        failures = await sim.open()
        opened_s = time.monotonic() - started
        return failures

    while True:
        command = (await loop.run_in_executor(None, conn.recv))[0]
        if command == "open":  # answered at once: the run asks how far it got when the ramp ends
            opening = asyncio.create_task(open_all())
            conn.send(None)
        elif command == "opened":
            failures = opening.result() if opening is not None and opening.done() else []
            conn.send((sim.opened, opened_s, failures))
        elif command == "reset":
            sim.reset()
            conn.send(None)
        elif command == "stats":
            s = sim.stats
            conn.send((s.beats, s.missed, s.worst_late_s, list(s.ended), s.reattached))
        elif command == "deleted":
            conn.send([n.deleted.get(DELETED) for n in sim.nodes])
        elif command == "stop":
            if opening is not None:
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)
            await sim.close()
            conn.send(None)
            return


# -- the echo nodes' and the load generator's processes -----------------------------------------------


def _echo_main(conn: Connection, balancers: list[str], key: str) -> None:
    asyncio.run(_serve_echo(conn, balancers, key))


async def _serve_echo(conn: Connection, balancers: list[str], key: str) -> None:
    from common.logs import configure_logging
    from devkit.echo_node import EchoNode

    configure_logging("console", "warning")
    nodes = [
        EchoNode(b, api_key=key, node_id=f"echo-{i}", models=(ROUTED_MODEL,)) for i, b in enumerate(balancers)
    ]
    for node in nodes:
        await node.start()
    conn.send([node.node_id for node in nodes])
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
    for node in nodes:
        await node.stop()
    conn.send(None)


def _load_main(conn: Connection, key: str) -> None:
    asyncio.run(_drive(conn, key))


async def _drive(conn: Connection, key: str) -> None:
    request = ipb.CompleteRequest(model=ROUTED_MODEL, prompt="hi", params=ipb.SamplingParams(max_tokens=1))
    auth = bearer_metadata(key)
    channels: dict[str, grpc.aio.Channel] = {}
    loop = asyncio.get_running_loop()
    while True:
        command, *args = await loop.run_in_executor(None, conn.recv)
        if command == "stop":
            for channel in channels.values():
                await channel.close(None)
            conn.send(None)
            return
        targets, seconds = args
        for target in targets:
            if target not in channels:
                channels[target] = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        stubs = [igrpc.InferenceStub(channels[t]) for t in targets]
        conn.send(await _load(stubs, request, auth, seconds))


async def _load(
    stubs: list[Any], request: ipb.CompleteRequest, auth: tuple[tuple[str, str], ...], seconds: float
) -> tuple[int, int, float, list[str]]:
    """IN_FLIGHT workers spread evenly over ``stubs`` for ``seconds``: calls done, failed, wall seconds,
    and the first error."""
    done = failed = 0
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds

    async def worker(stub: Any) -> None:
        nonlocal done, failed
        while time.perf_counter() < stop_at:
            try:
                text = "".join([c.delta async for c in stub.Complete(request, timeout=30, metadata=auth)])
                if text != "hi":
                    raise RuntimeError(f"expected the echo 'hi', got {text!r}")
                done += 1
            except (grpc.aio.AioRpcError, RuntimeError) as exc:
                failed += 1
                errors.append(repr(exc)[:200])

    started = time.perf_counter()
    await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(IN_FLIGHT)))
    return done, failed, time.perf_counter() - started, errors[:1]


# -- the run --------------------------------------------------------------------------------------------


async def _ask(conn: Connection, *message: Any) -> Any:
    """Sends a command to a helper process and waits for its answer without blocking this loop."""
    conn.send(message)
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


@dataclass(slots=True)
class _FleetResult:
    online_s: float | None = None
    online_on: dict[str, tuple[int, float | None]] = field(default_factory=dict)  # replica -> most, when all
    opened: int = 0  # nodes whose first session opened by the end of the ramp
    opened_s: float | None = 0.0  # until every node had registered and opened its session once
    reattached: int = 0
    warnings: dict[str, Counter[str]] = field(default_factory=dict)  # replica -> event -> count
    failures: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    beats: int = 0
    due: float = 0.0  # heartbeats due between the simulators' two counts
    missed: int = 0
    worst_late_s: float = 0.0
    ended: list[str] = field(default_factory=list)
    notified: int = 0
    delete_error: str = ""  # how DeleteModel failed, if it did
    delays: dict[str, list[float]] = field(default_factory=dict)  # replica -> delay per node that got it


async def _fleet(server: PostgresServer, root: Path, postmaster: int) -> _FleetResult:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that has started gRPC
    result = _FleetResult()
    async with replica_pair(server, root, _REPLICA_ENV) as (a, b, key):
        per = NODES // SIMULATORS
        held = [a if i % 2 == 0 else b for i in range(SIMULATORS)]
        conns: list[Connection] = []
        procs: list[Any] = []
        for i, replica in enumerate(held):
            mine, theirs = ctx.Pipe()
            ids = [f"sim-{n:04d}" for n in range(i * per, (i + 1) * per)]
            procs.append(ctx.Process(target=_sim_main, args=(theirs, replica.address, key, ids), daemon=True))
            procs[-1].start()
            conns.append(mine)
        try:
            started = time.monotonic()
            for conn in conns:
                await _ask(conn, "open")
            result.online_on = {r.name: (0, None) for r in (a, b)}
            while time.monotonic() - started < ONLINE_TIMEOUT_S:
                for replica in (a, b):
                    count, when = await _online(replica, key), result.online_on[replica.name][1]
                    if count == NODES and when is None:
                        when = time.monotonic() - started
                    result.online_on[replica.name] = (max(count, result.online_on[replica.name][0]), when)
                if all(when is not None for _, when in result.online_on.values()):
                    result.online_s = time.monotonic() - started
                    break
                await asyncio.sleep(POLL_S)
            for conn in conns:
                opened, seconds, failures = await _ask(conn, "opened")
                result.opened += opened
                result.failures += failures
                if seconds is None:
                    result.opened_s = None
                elif result.opened_s is not None:
                    result.opened_s = max(result.opened_s, seconds)
            # Measured even if not every node came online: the report says how many were.
            await asyncio.sleep(SETTLE_S)
            counted = time.monotonic()
            for conn in conns:
                await _ask(conn, "reset")
            pids: dict[str, int | None] = {"replica A": a.pid, "replica B": b.pid}
            pids |= {
                f"simulator {i + 1} (nodes on {r.name})": p.pid
                for i, (r, p) in enumerate(zip(held, procs, strict=True))
            }
            meter = CpuMeter(pids, postmaster)
            meter.start()
            await asyncio.sleep(STEADY_S)
            result.cpu = meter.shares()
            for conn in conns:
                beats, missed, late, ended, reattached = await _ask(conn, "stats")
                result.reattached += reattached
                result.beats += beats
                result.missed += missed
                result.worst_late_s = max(result.worst_late_s, late)
                result.ended += ended
            result.due = NODES * (time.monotonic() - counted) / HEARTBEAT_S

            async with grpc.aio.insecure_channel(a.address, options=CHANNEL_OPTIONS) as channel:
                asked = time.monotonic()
                try:
                    reply = await rgrpc.RegistryStub(channel).DeleteModel(
                        rpb.DeleteModelRequest(model_id=DELETED),
                        timeout=CALL_TIMEOUT_S,
                        metadata=bearer_metadata(key),
                    )
                except grpc.aio.AioRpcError as exc:
                    result.delete_error = f"{exc.code().name} after {time.monotonic() - asked:.1f} s"
                    reply = rpb.DeleteModelResponse()
            result.notified = reply.nodes_notified
            while True:
                got = [await _ask(c, "deleted") for c in conns]
                if (
                    all(t is not None for times in got for t in times)
                    or time.monotonic() - asked > DELETE_TIMEOUT_S
                ):
                    break
                await asyncio.sleep(0.2)
            for replica, times in zip(held, got, strict=True):
                result.delays.setdefault(replica.name, []).extend(t - asked for t in times if t is not None)
            result.warnings = {r.name: r.warnings() for r in (a, b)}
        finally:
            for conn in conns:
                with contextlib.suppress(OSError, EOFError):
                    await asyncio.wait_for(_ask(conn, "stop"), 30)
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
    return result


@dataclass(slots=True)
class _Phase:
    rps: list[float] = field(default_factory=list)
    failed: int = 0
    error: str = ""
    cpu: list[dict[str, float]] = field(default_factory=list)


async def _routing(server: PostgresServer, root: Path, postmaster: int) -> dict[str, _Phase]:
    ctx = multiprocessing.get_context("spawn")
    phases = {"A": _Phase(), "A+B": _Phase()}
    async with replica_pair(server, root, _REPLICA_ENV) as (a, b, key):
        echo_conn, echo_end = ctx.Pipe()
        load_conn, load_end = ctx.Pipe()
        echo = ctx.Process(target=_echo_main, args=(echo_end, [a.address, b.address], key), daemon=True)
        load = ctx.Process(target=_load_main, args=(load_end, key), daemon=True)
        echo.start()
        load.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, echo_conn.recv)
            deadline = time.monotonic() + START_TIMEOUT_S
            while [await _online(a, key), await _online(b, key)] != [2, 2]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the echo nodes are not online on both replicas")
                await asyncio.sleep(0.2)
            targets = {"A": [a.address], "A+B": [a.address, b.address]}
            for name in phases:  # warm-up: connections, the replicas' caches
                await _ask(load_conn, "load", targets[name], 1.0)
            assert echo.pid is not None and load.pid is not None  # both started above
            pids: dict[str, int | None] = {
                "replica A": a.pid,
                "replica B": b.pid,
                "echo nodes": echo.pid,
                "load generator": load.pid,
            }
            for _ in range(ROUNDS):
                for name, phase in phases.items():
                    meter = CpuMeter(pids, postmaster)
                    meter.start()
                    done, failed, wall, errors = await _ask(load_conn, "load", targets[name], LOAD_S)
                    phase.cpu.append(meter.shares())
                    phase.rps.append(done / wall)
                    phase.failed += failed
                    phase.error = phase.error or (errors[0] if errors else "")
        finally:
            for conn in (load_conn, echo_conn):
                with contextlib.suppress(OSError, EOFError):
                    await asyncio.wait_for(_ask(conn, "stop"), 30)
            for proc in (load, echo):
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
    return phases


async def run() -> str:
    """Runs both parts on one throw-away PostgreSQL; returns the markdown section."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        return "## Replicas on one PostgreSQL\n\nNot measured: PostgreSQL's binaries are not installed.\n"
    busy = os.getloadavg()[0]
    server = PostgresServer(bin_dir)
    server.start()
    try:
        postmaster = int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        with tempfile.TemporaryDirectory() as tmp:
            fleet = await _fleet(server, Path(tmp) / "fleet", postmaster)
            routing = await _routing(server, Path(tmp) / "routing", postmaster)
    finally:
        server.stop()
    return _report(fleet, routing, busy)


# -- the report -----------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def _report(fleet: _FleetResult, routing: dict[str, _Phase], busy: float) -> str:
    per = NODES // SIMULATORS
    lines = [
        "## Replicas on one PostgreSQL: 1,000 nodes over two replicas, and routing through one vs two",
        "",
        f"Everything on 127.0.0.1 of one machine with {os.cpu_count()} CPU(s), shared with other work (the "
        f"1-minute load average was {busy:.1f} when the run started): a throw-away PostgreSQL (no fsync), "
        "two `llmlb serve` processes on one database with auth on (replicas A and B), and helper "
        "processes. CPU is each process's CPU time over the window (from /proc) as a share of one core; "
        "PostgreSQL counts the server and all its backends; `whole machine` is every core's busy time, "
        "other people's work included.",
        "",
        "### 1,000 simulated nodes, half on each replica",
        "",
        f"Two simulator processes (one per replica, {per} nodes each, so that a simulator falling behind "
        "is not mistaken for a slow balancer; their own CPU and lag are below) register their nodes and "
        "hold one "
        f"`NodeSession` each over {SIM_CHANNELS} connections per simulator, with a heartbeat every "
        f"{HEARTBEAT_S:.0f} s (the default) carrying {len(FLEET_MODELS)} models, and no Inference server "
        f"(nothing is routed to them). Steady window: {STEADY_S:.0f} s, from {SETTLE_S:.0f} s after the "
        f"ramp (every node online on both, or {ONLINE_TIMEOUT_S:.0f} s). Then `DeleteModel({DELETED})` "
        "through A's gRPC door; the delay is from that call until each node received its delete "
        "command (one monotonic clock for all processes).",
        "",
    ]
    reached = "; ".join(
        f"{name}: {f'all after {when:.1f} s' if when is not None else f'at most {most:,}'}"
        for name, (most, when) in fleet.online_on.items()
    )
    if fleet.online_s is None:
        lines.append(
            f"- **not all {NODES:,} nodes were listed online on both replicas within "
            f"{ONLINE_TIMEOUT_S:.0f} s** ({reached}); the rest was measured with those that were"
        )
    else:
        lines.append(
            f"- all {NODES:,} registered, attached and listed online on both replicas "
            f"{fleet.online_s:.1f} s after the first registration began ({reached})"
        )
    lines.append(
        f"- every node had registered and opened its session once after {fleet.opened_s:.1f} s "
        f"({REGISTER_IN_FLIGHT} at a time per simulator)"
        if fleet.opened_s is not None
        else f"- **by the end of the ramp only {fleet.opened:,} of {NODES:,} nodes had registered and "
        f"opened a session once** ({REGISTER_IN_FLIGHT} at a time per simulator; the rest kept trying)"
    )
    if fleet.failures:
        lines.append(f"- {len(fleet.failures)} nodes failed to register or open: {fleet.failures[0]}")
    if fleet.cpu:
        lines += ["", "| process | CPU, share of one core |", "|---|---|"]
        lines += [f"| {name} | {share:.0%} |" for name, share in fleet.cpu.items()]
        lines.append("")
        worst = max(fleet.cpu["replica A"], fleet.cpu["replica B"])
        lines.append(
            f"- busiest replica: {worst:.0%} of one core with {per} nodes beating on it (goal < "
            f"{GOAL_CPU:.0%}: {_verdict(worst < GOAL_CPU)})"
        )
        lines.append(
            f"- heartbeats sent in the window: {fleet.beats:,} of {fleet.due:,.0f} due; {fleet.missed} "
            f"skipped, the latest {fleet.worst_late_s * 1000:.0f} ms behind schedule (how well the "
            "simulators kept up)"
        )
    if fleet.ended:
        lines.append(
            f"- {len(fleet.ended)} sessions ended under the run, e.g. `{fleet.ended[0]}`; "
            f"{fleet.reattached} were opened again (a second later, as a node's link does)"
        )
    for name, events in fleet.warnings.items():
        if events:
            top = ", ".join(f"`{event}` ({count})" for event, count in events.most_common(4))
            lines.append(f"- replica {name} logged {sum(events.values()):,} warnings or errors: {top}")
    if fleet.delete_error:
        lines.append(
            f"- **`DeleteModel` through A failed: {fleet.delete_error}** (the replica was saturated)"
        )
    if fleet.delays:
        every = [d for ds in fleet.delays.values() for d in ds]
        last = max(every) if len(every) == NODES else None
        lines.append(
            f"- delete through A: queued for {fleet.notified:,} nodes; received by {len(every):,} of "
            f"{NODES:,}; "
            + (
                f"the last after {last:.2f} s"
                if last is not None
                else f"**{NODES - len(every)} never got it within {DELETE_TIMEOUT_S:.0f} s**"
            )
            + f" (goal < {GOAL_DELETE_S:.0f} s: {_verdict(last is not None and last < GOAL_DELETE_S)})"
        )
        for name, ds in fleet.delays.items():
            if ds:
                lines.append(
                    f"  - nodes held by {name}: median {statistics.median(ds):.2f} s, last {max(ds):.2f} s"
                )
    rows = []
    for name, phase in routing.items():
        cpu = {k: statistics.mean(c[k] for c in phase.cpu) for k in phase.cpu[0]} if phase.cpu else {}
        rate = statistics.mean(phase.rps) if phase.rps else 0.0
        rounds = " / ".join(f"{r:,.0f}" for r in phase.rps)
        shares = " / ".join(f"{cpu[k]:.0%}" for k in cpu)
        failed = f" ({phase.failed} failed: {phase.error})" if phase.failed else ""
        rows.append(f"| {name} | {rate:,.0f}{failed} | {rounds} | {shares} |")
    header_cpu = (
        " / ".join(next(iter(routing.values())).cpu[0])
        if routing and next(iter(routing.values())).cpu
        else ""
    )
    one, two = (statistics.mean(routing[k].rps) if routing[k].rps else 0.0 for k in ("A", "A+B"))
    lines += [
        "",
        "### Routed requests/s: one replica vs two",
        "",
        "Both replicas restarted on a fresh database; two echo nodes (`devkit/echo_node.py`, real gRPC "
        "servers, one process, one node attached to each replica) and a load generator in its own process "
        f"sending 1-token gRPC `Complete` calls with {IN_FLIGHT} in flight: all to A, then spread evenly "
        f"over A and B, {LOAD_S:.0f} s each, alternating for {ROUNDS} rounds after a warm-up. Each replica "
        "routes to both nodes, the one held by the other replica included.",
        "",
        f"| through | requests/s (mean) | per round | CPU {header_cpu} |",
        "|---|---|---|---|",
        *rows,
        "",
        f"- two replicas / one: {two / one:.2f}x" if one else "- not measured",
        f"- the caveat: this machine has {os.cpu_count()} cores, and the replicas, the echo nodes, the load "
        "generator and PostgreSQL all compete for them (and with other work on the machine), so a second "
        "replica adds no cores, only another process to share them with. A ratio near 1 is expected here "
        "and says nothing about a machine with a core per replica; the CPU columns show where the time went.",
        "",
    ]
    return "\n".join(lines)
