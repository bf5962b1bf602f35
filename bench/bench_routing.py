"""Routing overhead: one small Complete (a 1-token echo) sent straight to a node, through the balancer's
gRPC door and through its HTTP shim, side by side in one run.

Three processes on 127.0.0.1: the balancer runs in this process (auth on, as by default: every routed
call presents the admin key), an echo node (``devkit.echo_node``: a real gRPC node that answers
at once) in a second, and the load generator in a third, so the balancer's process does only the
balancer's work. A bare gRPC relay (one more server and client hop, no routing) in the balancer's
process shows how much of the door's cost is gRPC itself. Latency is sequential calls, interleaved by
path in rounds so drift hits all alike; throughput is a fixed number of calls in flight for a fixed
time. Goals: the gRPC door adds at most
0.5 ms at p50, the HTTP shim at most 1.5 ms, and the balancer routes at least 2,000 requests/s.

The ``-limits`` paths repeat the gRPC door and the minimal HTTP client with an api key that has every
per-key limit set (``balancer.edge.limits``; none reached, its model list naming the one model), in
the same rounds as the others: goal, within noise of the same door with the admin key, which has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx

from balancer.server import start
from common.channels import bearer_metadata
from common.config import load_balancer_config
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import CHANNEL_OPTIONS, SERVER_OPTIONS
from common.types import KeyLimits, Scope

MODEL = "gemma-3-270m"
PROMPT = "hi"
WARMUP = 200
SEQUENTIAL = 2000  # per path
ROUNDS = 4
IN_FLIGHT = 64
LOAD_SECONDS = 5.0
GOAL_GRPC_MS = 0.5
GOAL_HTTP_MS = 1.5
GOAL_RPS = 2000
PATHS = ("node", "relay", "grpc", "grpc-limits", "http", "http-raw", "http-raw-limits")
# Every limit set, none reached in the run: each request pays for every check.
BENCH_LIMITS = KeyLimits(
    rpm=10**9, tpm=10**12, max_parallel=10**6, daily_tokens=10**13, monthly_tokens=10**14, models=(MODEL,)
)
NAMES = {
    "node": "direct to the echo node (gRPC)",
    "relay": "bare gRPC relay in the balancer's process -> node (no routing)",
    "grpc": "balancer gRPC door -> node",
    "http": "balancer HTTP shim `/v1/completions` -> node (httpx)",
    "http-raw": "same, minimal HTTP/1.1 client (no library)",
    "grpc-limits": "balancer gRPC door -> node, key with every limit set",
    "http-raw-limits": "same minimal HTTP client, key with every limit set",
}
Call = Callable[[], Awaitable[None]]


# -- the echo node's process --------------------------------------------------------------------------


def _node_main(conn: Connection, balancer: str, key: str) -> None:
    asyncio.run(_serve_node(conn, balancer, key))


async def _serve_node(conn: Connection, balancer: str, key: str) -> None:
    from common.logs import configure_logging
    from devkit.echo_node import EchoNode

    configure_logging("console", "warning")
    node = EchoNode(balancer, api_key=key, models=(MODEL,))
    await node.start()
    conn.send(node.address)
    loop = asyncio.get_running_loop()
    while (await loop.run_in_executor(None, conn.recv))[0] == "cpu":
        conn.send(time.process_time())
    await node.stop()


# -- the load generator's process ---------------------------------------------------------------------


def _client_main(conn: Connection, targets: dict[str, str], key: str, limited: str) -> None:
    asyncio.run(_drive(conn, targets, key, limited))


def _check(text: str) -> None:
    if text != PROMPT:
        raise RuntimeError(f"expected the echo {PROMPT!r}, got {text!r}")


class _RawHttp:
    """A minimal HTTP/1.1 keep-alive client, one connection, one request at a time: the shim's load
    without an HTTP library's own cost."""

    def __init__(self, address: str, key: str, body: bytes) -> None:
        self._host, _, port = address.rpartition(":")
        self._port = int(port)
        self._request = (
            f"POST /v1/completions HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __call__(self) -> None:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._streams
        writer.write(self._request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next(int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:"))
        answer = await reader.readexactly(length)
        if not head[0].startswith("HTTP/1.1 200"):
            raise RuntimeError(f"{head[0]}: {answer[:120]!r}")
        _check(json.loads(answer)["choices"][0]["text"])

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def _drive(conn: Connection, targets: dict[str, str], key: str, limited: str) -> None:
    request = ipb.CompleteRequest(model=MODEL, prompt=PROMPT, params=ipb.SamplingParams(max_tokens=1))
    auth = bearer_metadata(key)
    limited_auth = bearer_metadata(limited)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "stream": False}
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    raw: list[_RawHttp] = []
    async with (
        grpc.aio.insecure_channel(targets["node"], options=CHANNEL_OPTIONS) as node_channel,
        grpc.aio.insecure_channel(targets["relay"], options=CHANNEL_OPTIONS) as relay_channel,
        grpc.aio.insecure_channel(targets["grpc"], options=CHANNEL_OPTIONS) as door_channel,
        httpx.AsyncClient(
            base_url=f"http://{targets['http']}",
            headers={"authorization": f"Bearer {key}"},
            limits=limits,
            timeout=30,
        ) as client,
    ):
        node_stub = igrpc.InferenceStub(node_channel)
        relay_stub = igrpc.InferenceStub(relay_channel)
        door_stub = igrpc.InferenceStub(door_channel)

        async def via_node() -> None:
            _check("".join([c.delta async for c in node_stub.Complete(request, timeout=30)]))

        async def via_relay() -> None:
            _check("".join([c.delta async for c in relay_stub.Complete(request, timeout=30)]))

        async def via_door() -> None:
            _check("".join([c.delta async for c in door_stub.Complete(request, timeout=30, metadata=auth)]))

        async def via_door_limited() -> None:
            chunks = door_stub.Complete(request, timeout=30, metadata=limited_auth)
            _check("".join([c.delta async for c in chunks]))

        async def via_httpx() -> None:
            reply = await client.post("/v1/completions", json=body)
            reply.raise_for_status()
            _check(reply.json()["choices"][0]["text"])

        def raw_connection(secret: str = key) -> Call:
            raw.append(_RawHttp(targets["http"], secret, json.dumps(body).encode()))
            return raw[-1]

        # Each worker asks for its call: the gRPC channels and httpx's pool are shared, raw HTTP is not.
        makers: dict[str, Callable[[], Call]] = {
            "node": lambda: via_node,
            "relay": lambda: via_relay,
            "grpc": lambda: via_door,
            "http": lambda: via_httpx,
            "http-raw": raw_connection,
            "grpc-limits": lambda: via_door_limited,
            "http-raw-limits": lambda: raw_connection(limited),
        }
        loop = asyncio.get_running_loop()
        try:
            while True:
                command, *args = await loop.run_in_executor(None, conn.recv)
                if command == "stop":
                    return
                if command == "probe":
                    conn.send(await _probe(makers[args[0]]()))
                elif command == "latency":
                    conn.send(await _latency(makers[args[0]](), args[1]))
                elif command == "load":
                    conn.send(await _load(makers[args[0]]))
        finally:
            for connection in raw:
                await connection.close()


async def _probe(call: Call) -> str:
    """Empty when the path answers correctly; else why not."""
    try:
        await call()
    except httpx.HTTPStatusError as exc:
        return f"answered HTTP {exc.response.status_code}: {exc.response.text[:120]}"
    except Exception as exc:
        return f"failed: {exc!r}"[:200]
    return ""


async def _latency(call: Call, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def _load(make_call: Callable[[], Call]) -> tuple[int, int, float, float]:
    """Calls done and failed with IN_FLIGHT at once for LOAD_SECONDS; wall and CPU seconds it took."""
    done = failed = 0
    stop_at = time.perf_counter() + LOAD_SECONDS

    async def worker(call: Call) -> None:
        nonlocal done, failed
        while time.perf_counter() < stop_at:
            try:
                await call()
                done += 1
            except Exception:
                failed += 1

    calls = [make_call() for _ in range(IN_FLIGHT)]
    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(call) for call in calls))
    return done, failed, time.perf_counter() - started, time.process_time() - cpu


# -- this process: the balancer, and the run ----------------------------------------------------------


@dataclass(slots=True)
class _Relay:
    """A bare pass-through hop for Complete in this process: the floor one more gRPC server and client
    cost, without routing, auth or metrics."""

    server: grpc.aio.Server
    channel: grpc.aio.Channel
    port: int

    @classmethod
    async def start(cls, node: str) -> _Relay:
        channel = grpc.aio.insecure_channel(node, options=CHANNEL_OPTIONS)
        stub = igrpc.InferenceStub(channel)

        async def complete(request: ipb.CompleteRequest, context: Any) -> AsyncIterator[ipb.TextChunk]:
            async for chunk in stub.Complete(request, timeout=context.time_remaining()):
                yield chunk

        server = grpc.aio.server(options=SERVER_OPTIONS)
        handler = grpc.unary_stream_rpc_method_handler(
            complete,
            request_deserializer=ipb.CompleteRequest.FromString,
            response_serializer=ipb.TextChunk.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("llmlb.v1.Inference", {"Complete": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return cls(server, channel, port)

    async def stop(self) -> None:
        await self.server.stop(None)
        await self.channel.close(None)


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _ask(conn: Connection, *message: Any) -> Any:
    """Sends a command to a helper process and waits for its answer without blocking the balancer."""
    conn.send(message)
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


async def run() -> str:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that has started gRPC
    busy = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        config = load_balancer_config(
            home=Path(tmp),
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            # Every call in flight may go to the one node: this measures routing, not the wait queue.
            env={"LLMLB_HOME": tmp, "LLMLB_NODE_MAX_INFLIGHT": str(IN_FLIGHT * 2)},
            log_level="warning",
        )
        balancer = await start(config)
        key = config.admin_key_file.read_text().strip()
        _, limited = await balancer.parts.keys.create("bench-limits", [Scope.API], limits=BENCH_LIMITS)
        door = f"127.0.0.1:{balancer.port}"
        node_conn, node_end = ctx.Pipe()
        client_conn, client_end = ctx.Pipe()
        node_proc = ctx.Process(target=_node_main, args=(node_end, door, key), daemon=True)
        node_proc.start()
        client_proc: Any = None
        relay: _Relay | None = None
        try:
            node = await asyncio.get_running_loop().run_in_executor(None, node_conn.recv)
            relay = await _Relay.start(node)
            targets = {
                "node": node,
                "relay": f"127.0.0.1:{relay.port}",
                "grpc": door,
                "http": f"127.0.0.1:{balancer.http_port}",
            }
            client_proc = ctx.Process(
                target=_client_main, args=(client_end, targets, key, limited), daemon=True
            )
            client_proc.start()
            skipped = {p: why for p in PATHS if (why := await _ask(client_conn, "probe", p))}
            if "http" in skipped:
                skipped["http-raw"] = skipped["http-raw-limits"] = skipped["http"]
            if skipped.keys() & {"node", "relay", "grpc"}:
                raise RuntimeError(f"routing bench cannot run: {skipped}")
            paths = [p for p in PATHS if p not in skipped]
            samples: dict[str, list[float]] = {p: [] for p in paths}
            for path in paths:
                await _ask(client_conn, "latency", path, WARMUP)
            for _ in range(ROUNDS):
                for path in paths:
                    samples[path] += await _ask(client_conn, "latency", path, SEQUENTIAL // ROUNDS)
            load: dict[str, tuple[float, int, float, float, float]] = {}
            for path in paths:
                cpu, node_cpu = time.process_time(), await _ask(node_conn, "cpu")
                done, failed, wall, client_cpu = await _ask(client_conn, "load", path)
                balancer_cpu = time.process_time() - cpu
                node_cpu = await _ask(node_conn, "cpu") - node_cpu
                load[path] = (done / wall, failed, client_cpu / wall, balancer_cpu / wall, node_cpu / wall)
        finally:
            for conn in (client_conn, node_conn):
                with contextlib.suppress(OSError):
                    conn.send(("stop",))
            for proc in (client_proc, node_proc):
                if proc is not None:
                    proc.join(timeout=10)
                    if proc.is_alive():
                        proc.kill()
            if relay is not None:
                await relay.stop()
            await balancer.stop(grace=0)
    return _report(samples, load, skipped, busy)


def _report(
    samples: dict[str, list[float]],
    load: dict[str, tuple[float, int, float, float, float]],
    skipped: dict[str, str],
    busy: float,
) -> str:
    def p50(path: str) -> float:
        return _pct(samples[path], 0.5)

    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"

    rows = []
    for path in PATHS:
        if path in skipped:
            rows.append(f"| {NAMES[path]} | not measured | | | | | |")
            continue
        rps, failed, client, bal, node = load[path]
        added = "" if path == "node" else f"+{p50(path) - p50('node'):.3f}"
        cost = "" if path == "node" else f"{1000 * bal / rps:.2f}"
        rows.append(
            f"| {NAMES[path]} | {p50(path):.3f} | {_pct(samples[path], 0.99):.3f} | {added} "
            f"| {rps:,.0f}{f' ({failed} failed)' if failed else ''} "
            f"| {client:.0%} / {bal:.0%} / {node:.0%} | {cost} |"
        )
    grpc_added = p50("grpc") - p50("node")
    grpc_rps = load["grpc"][0]
    lines = [
        f"- gRPC door adds {grpc_added:.3f} ms at p50 (goal ≤ {GOAL_GRPC_MS} ms: "
        f"{verdict(grpc_added <= GOAL_GRPC_MS)}); a bare relay hop adds {p50('relay') - p50('node'):.3f} "
        f"ms, so routing, auth and metrics account for {p50('grpc') - p50('relay'):.3f} ms of it",
    ]
    if "http" in skipped:
        lines.append(f"- HTTP shim: not measured, `POST /v1/completions` {skipped['http']}")
    else:
        http_added = p50("http") - p50("node")
        lines.append(
            f"- HTTP shim adds {http_added:.3f} ms at p50 with httpx (goal ≤ {GOAL_HTTP_MS} ms: "
            f"{verdict(http_added <= GOAL_HTTP_MS)})"
            + (
                f"; {p50('http-raw') - p50('node'):.3f} ms with the minimal client"
                if "http-raw" in load
                else ""
            )
        )
    lines.append(
        f"- routed through the gRPC door: {grpc_rps:,.0f} requests/s "
        f"(goal ≥ {GOAL_RPS:,}: {verdict(grpc_rps >= GOAL_RPS)})"
    )
    if "grpc-limits" in load:
        limited_rps, limited_cpu = load["grpc-limits"][0], load["grpc-limits"][3]
        lines.append(
            f"- with every limit set on the key: the gRPC door adds {p50('grpc-limits') - p50('node'):.3f} "
            f"ms at p50 (without: {grpc_added:.3f}), {limited_rps:,.0f} requests/s (without: "
            f"{grpc_rps:,.0f}), {1000 * limited_cpu / limited_rps:.2f} balancer CPU ms per request "
            f"(without: {1000 * load['grpc'][3] / grpc_rps:.2f})"
            + (
                f"; the HTTP shim with the minimal client adds {p50('http-raw-limits') - p50('node'):.3f} "
                f"ms (without: {p50('http-raw') - p50('node'):.3f}), {load['http-raw-limits'][0]:,.0f} "
                f"requests/s (without: {load['http-raw'][0]:,.0f})"
                if "http-raw-limits" in load and "http-raw" in load
                else ""
            )
        )
    if "http-raw" in load:
        raw_rps = load["http-raw"][0]
        lines.append(
            f"- routed through the HTTP shim: {raw_rps:,.0f} requests/s with the minimal client "
            f"(goal ≥ {GOAL_RPS:,}: {verdict(raw_rps >= GOAL_RPS)}); httpx as the load generator reaches "
            f"{load['http'][0]:,.0f}/s, limited by its own per-request cost"
        )
    return "\n".join(
        [
            "## Routing overhead: one 1-token Complete, direct vs through the balancer",
            "",
            f"Three processes on {os.cpu_count()} CPU(s): the balancer (auth on: each call presents the "
            "admin key), an echo node that answers at once (a real gRPC node from `devkit/echo_node.py`), "
            "and "
            "the load generator, so the balancer's process does only the balancer's work; the bare relay "
            "runs in the balancer's process while the balancer idles. Latency: "
            f"{SEQUENTIAL} sequential calls per path after {WARMUP} warm-up calls, interleaved in "
            f"{ROUNDS} rounds. Throughput: {IN_FLIGHT} calls in flight for {LOAD_SECONDS:.0f} s per path "
            "(node in-flight limit raised so nothing waits in the balancer's queue). CPU is each "
            "process's CPU time over the window as a share of one core (load generator / balancer / "
            "node); `balancer CPU ms` is the balancer's CPU time per routed request. HTTP is "
            "non-streaming JSON over keep-alive connections: httpx with a pool of "
            f"{IN_FLIGHT}, and a minimal HTTP/1.1 client (one connection per worker) that shows what "
            "the shim costs without an HTTP library's own overhead. The 1-minute load average "
            f"was {busy:.1f} when the run started: on a shared machine, other work skews every row.",
            "",
            "| path | p50 ms | p99 ms | added at p50 ms | requests/s | CPU client / balancer / node "
            "| balancer CPU ms |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            *lines,
            "",
        ]
    )
