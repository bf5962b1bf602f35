"""Transport abuse against real `llmlb serve` and `xllm serve` processes, bounded and on 127.0.0.1 only.

Callers without a key: header floods, heads sent slowly or half, idle kept-alive connections and more
connections than a port takes, on each HTTP/1.1 port (the balancer's HTTP door and bulk port, a node's
bulk and metrics ports); and oversized gRPC messages on both gRPC ports. What they see: a 431 or a
closed connection, in bounded time; what the server pays: bounded RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc
from common.rpc import CHANNEL_OPTIONS
from devkit.fake_hub import FakeHub
from devkit.ports import free_port
from tests.conftest import hermetic
from tests.integration.conftest import DIRECT_TOKEN, BalancerProcess, NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# Short limits, so the drills take seconds; the defaults are 64 KiB, 10 s, 5 s and 1024.
HEADER_KB = 64
HEADER_TIMEOUT_S = 3.0
KEEPALIVE_S = 1.0
MAX_CONNECTIONS = 50
LIMITS = {"MAX_HEADER_KB": str(HEADER_KB), "HEADER_TIMEOUT": "3", "KEEPALIVE_TIMEOUT": "1"} | {
    "MAX_CONNECTIONS": str(MAX_CONNECTIONS)
}
MB = 1024 * 1024
RSS_GROWTH_MB = 100  # what a flood may add to a server's resident memory
SLACK_S = 3.0  # scheduling slack on a busy machine, on top of a limit's own time


@dataclass(frozen=True, slots=True)
class Door:
    """One HTTP/1.1 port: its name, port, the process behind it, and a request it answers."""

    name: str
    port: int
    pid: int
    request: bytes


@dataclass(frozen=True, slots=True)
class Fleet:
    balancer: BalancerProcess
    node: NodeProcess
    doors: tuple[Door, ...]


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A balancer and a node with short transport limits, their four HTTP ports found."""
    root = tmp_path_factory.mktemp("abuse")
    with pytest.MonkeyPatch.context() as env, FakeHub() as hub:
        hermetic(env, root / "home")  # module-scoped: outside the per-test environment, so made alike here
        balancer_env = {f"LLMLB_{k}": v for k, v in LIMITS.items()}
        balancer = BalancerProcess(
            root / "balancer", {"HF_ENDPOINT": hub.url, "LLMLB_LOG_FORMAT": "json", **balancer_env}
        )
        balancer.start()
        metrics_port = free_port()
        node_env = {
            "HF_ENDPOINT": hub.url,
            "XLLM_LOG_FORMAT": "json",
            "XLLM_AUTH_TOKEN": DIRECT_TOKEN,
            "XLLM_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
            **balancer.node_env(),
            **{f"XLLM_{k}": v for k, v in LIMITS.items()},
        }
        node = NodeProcess(root / "node", balancer.address, node_env, [])
        try:
            node.start()
            assert balancer.proc is not None and node.proc is not None
            request = mpb.GetBulkEndpointRequest()
            balancer_bulk = balancer.manifest.GetBulkEndpoint(request, timeout=10).port
            with node.direct_channel() as channel:
                node_bulk = manifest_pb2_grpc.ManifestStub(channel).GetBulkEndpoint(request, timeout=10).port
            assert balancer_bulk and node_bulk
            blob = _get("/blob?model=abuse/none&file=x")  # answered 401: no token
            doors = (
                Door("balancer http", balancer.http_port, balancer.proc.pid, _get("/healthz")),
                Door("balancer bulk", balancer_bulk, balancer.proc.pid, blob),
                Door("node bulk", node_bulk, node.proc.pid, blob),
                Door("node metrics", metrics_port, node.proc.pid, _get("/metrics")),
            )
            yield Fleet(balancer, node, doors)
        finally:
            node.stop()
            balancer.stop()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@contextlib.asynccontextmanager
async def peak_growth(pids: set[int]) -> AsyncIterator[dict[int, float]]:
    """Yields a dict that holds, once the block ends, each process's peak RSS growth (MB) during it."""
    base = {pid: rss_mb(pid) for pid in pids}
    peak = dict(base)
    growth: dict[int, float] = {}

    async def sample() -> None:
        while True:
            for pid in pids:
                peak[pid] = max(peak[pid], rss_mb(pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        yield growth
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        for pid in pids:
            peak[pid] = max(peak[pid], rss_mb(pid))
            growth[pid] = peak[pid] - base[pid]


async def until_closed(reader: asyncio.StreamReader, within: float) -> tuple[bool, bytes]:
    """Reads until the server ends the connection (EOF or reset): (whether it did in time, what came)."""
    got = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                got += chunk[: 4096 - len(got)]  # the start is all any check needs
    except TimeoutError:
        return False, got
    except (ConnectionError, OSError):
        pass
    return True, got


async def on_every_door(fleet: Fleet, drill: Callable[[Door], Awaitable[None]]) -> None:
    """Runs ``drill`` against the four ports at once."""
    await asyncio.gather(*(drill(door) for door in fleet.doors))


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


async def test_a_head_over_the_limit_is_answered_431_and_the_connection_closes(fleet: Fleet) -> None:
    async def drill(door: Door) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        try:
            writer.write(door.request[:-2] + b"X-Big: " + b"a" * (HEADER_KB + 16) * 1024 + b"\r\n\r\n")
            await writer.drain()
            closed, answer = await until_closed(reader, SLACK_S)
        finally:
            writer.close()
        assert closed, f"{door.name}: still open after an oversized head"
        assert status_of(answer) == 431, f"{door.name}: {answer[:200]!r}"
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "headers_too_large", door.name

    await on_every_door(fleet, drill)


async def test_header_floods_are_cut_off_and_leave_memory_bounded(fleet: Fleet) -> None:
    """40 connections each sending up to 20 MB of a head that never ends (50 MB to /healthz once)."""
    chunk = b"a" * (256 * 1024)

    async def flood(door: Door, size: int) -> tuple[bool, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        try:
            writer.write(door.request[:-2] + b"X-Flood: ")
            with contextlib.suppress(ConnectionError, OSError):
                for _ in range(size // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
            return await until_closed(reader, SLACK_S)
        finally:
            writer.close()

    async def drill(door: Door) -> None:
        sizes = [50 * MB] + [20 * MB] * 39
        results = await asyncio.gather(*(flood(door, size) for size in sizes))
        still_open = sum(not closed for closed, _ in results)
        assert not still_open, f"{door.name}: {still_open} flooding connections left open"
        answered = {status_of(answer) for _, answer in results} - {0}
        assert answered <= {431}, f"{door.name}: a flood was answered {answered}"

    async with peak_growth({door.pid for door in fleet.doors}) as growth:
        await asyncio.wait_for(on_every_door(fleet, drill), 60)
    assert max(growth.values()) < RSS_GROWTH_MB, f"peak RSS growth by pid, MB: {growth}"


async def test_a_head_sent_slowly_or_in_half_is_closed_after_the_header_timeout(fleet: Fleet) -> None:
    """30 connections send half a head and then nothing; 1 drips a byte every 0.2 s forever."""

    async def half(door: Door) -> float:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        try:
            writer.write(door.request[: len(door.request) // 2])
            await writer.drain()
            closed, _ = await until_closed(reader, HEADER_TIMEOUT_S + SLACK_S)
            assert closed, f"{door.name}: a half head still open past the header timeout"
            return time.monotonic() - started
        finally:
            writer.close()

    async def drip(door: Door) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        try:
            async with asyncio.timeout(HEADER_TIMEOUT_S + SLACK_S):
                with contextlib.suppress(ConnectionError, OSError):
                    writer.write(door.request[:-2])
                    while not reader.at_eof():
                        writer.write(b"X-Drip: a\r\n")
                        await writer.drain()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(reader.read(65536), 0.2)
        except TimeoutError:
            raise AssertionError(f"{door.name}: a dripping head still open past the header timeout") from None
        finally:
            writer.close()

    async def drill(door: Door) -> None:
        times = await asyncio.gather(*(half(door) for _ in range(30)), drip(door))
        first = min(t for t in times if t is not None)
        assert first >= HEADER_TIMEOUT_S - 0.5, f"{door.name}: closed after {first:.1f} s, before the timeout"

    await on_every_door(fleet, drill)


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(fleet: Fleet) -> None:
    async def drill(door: Door) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        try:
            writer.write(door.request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK_S)
            assert status_of(head) in (200, 401), f"{door.name}: {head[:200]!r}"
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            closed, _ = await until_closed(reader, KEEPALIVE_S + SLACK_S)
            assert closed, f"{door.name}: an idle kept-alive connection still open"
        finally:
            writer.close()

    await on_every_door(fleet, drill)


async def test_connections_past_the_cap_are_closed_at_once(fleet: Fleet) -> None:
    async def drill(door: Door) -> None:
        streams = [await asyncio.open_connection("127.0.0.1", door.port) for _ in range(MAX_CONNECTIONS + 10)]
        try:
            # Well before the header timeout would close the others.
            results = await asyncio.gather(*(until_closed(reader, 1.0) for reader, _ in streams))
        finally:
            for _, writer in streams:
                writer.close()
        closed = sum(done for done, _ in results)
        assert 10 <= closed < MAX_CONNECTIONS, f"{door.name}: {closed} of {len(streams)} closed at once"

    await on_every_door(fleet, drill)


def _bytes_message(size: int) -> bytes:
    """A protobuf message whose field 1 holds ``size`` bytes ('a's), framed by hand."""
    length, varint = size, b""
    while length > 0x7F:
        varint += bytes([length & 0x7F | 0x80])
        length >>= 7
    return b"\x0a" + varint + bytes([length]) + b"a" * size


async def _send_calls(
    address: str, method: str, calls: int, size: int, made_up_keys: bool = False
) -> list[grpc.StatusCode]:
    """``calls`` concurrent calls of ``size`` bytes each; with ``made_up_keys``, each with a new key."""
    payload = _bytes_message(size)
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)

        async def one() -> grpc.StatusCode:
            metadata = (("authorization", f"Bearer llmlb-{secrets.token_hex(16)}"),) if made_up_keys else None
            try:
                await call(payload, timeout=30, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        return list(await asyncio.gather(*(one() for _ in range(calls))))


async def test_grpc_calls_without_a_key_are_refused_before_their_message_is_read(fleet: Fleet) -> None:
    """8 calls of 60 MB each without a key, on the balancer's and the node's gRPC ports."""
    balancer, node = fleet.balancer, fleet.node
    assert balancer.proc is not None and node.proc is not None
    async with peak_growth({balancer.proc.pid, node.proc.pid}) as growth:
        codes = await asyncio.gather(
            _send_calls(balancer.address, "/llmlb.v1.Inference/Transcribe", 8, 60 * MB),
            _send_calls(node.address, "/llmlb.v1.Inference/Transcribe", 8, 60 * MB),
        )
    assert {code for each in codes for code in each} == {grpc.StatusCode.UNAUTHENTICATED}
    assert max(growth.values()) < RSS_GROWTH_MB, f"peak RSS growth by pid, MB: {growth}"


async def test_grpc_calls_with_made_up_keys_are_refused_before_their_message_is_read(fleet: Fleet) -> None:
    """8 calls of 60 MB each, each with a key nobody issued: the balancer checks a never-seen key with
    the caller's address (which only the handler sees), still before the message is read."""
    balancer, node = fleet.balancer, fleet.node
    assert balancer.proc is not None and node.proc is not None
    async with peak_growth({balancer.proc.pid, node.proc.pid}) as growth:
        codes = await asyncio.gather(
            _send_calls(balancer.address, "/llmlb.v1.Inference/Transcribe", 8, 60 * MB, made_up_keys=True),
            _send_calls(node.address, "/llmlb.v1.Inference/Transcribe", 8, 60 * MB, made_up_keys=True),
        )
    assert {code for each in codes for code in each} == {grpc.StatusCode.UNAUTHENTICATED}
    assert max(growth.values()) < RSS_GROWTH_MB, f"peak RSS growth by pid, MB: {growth}"


async def test_open_grpc_methods_take_in_one_oversized_request_at_a_time(fleet: Fleet) -> None:
    """Health checks take any caller, so their requests are read; one at a time, the others refused
    unread. A request read costs two to three times its size in RSS (gRPC's buffer, Python's copy, the
    parsed message), and calls that arrive after one was read may be read in turn: 8 of 20 MB cost
    the server a few reads' worth at most, where reading all 8 at once cost over 300 MB."""
    balancer, node = fleet.balancer, fleet.node
    assert balancer.proc is not None and node.proc is not None
    size_mb = 20
    async with peak_growth({balancer.proc.pid, node.proc.pid}) as growth:
        codes = await asyncio.gather(
            _send_calls(balancer.address, "/grpc.health.v1.Health/Check", 8, size_mb * MB),
            _send_calls(node.address, "/grpc.health.v1.Health/Check", 8, size_mb * MB),
        )
    for each in codes:
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in each, f"no call refused while another was read: {each}"
    assert max(growth.values()) < RSS_GROWTH_MB + 5 * size_mb, f"peak RSS growth by pid, MB: {growth}"
