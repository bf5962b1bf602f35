"""Real processes on 127.0.0.1: a balancer started with the `llmlb serve` entry point.

Auth is on, as in production: the fixtures read the balancer's bootstrap admin key, call it with that
key, and hand nodes (and `xllm` commands pointed at it) a node-scoped key minted through CreateKey.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.channels import bearer_metadata, client_credentials, open_channel
from common.pb.llmlb.v1 import manifest_pb2_grpc, registry_pb2_grpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import CHANNEL_OPTIONS
from devkit.fake_hub import FakeHub
from devkit.model_files import CACHE
from devkit.ports import free_port
from tests.fixtures.eventually import eventually

ROOT = Path(__file__).resolve().parents[2]
# The XLLM_AUTH_TOKEN of nodes a test calls directly, not through the balancer.
DIRECT_TOKEN = "direct-caller-token-3b9e"


def wait_serving(
    what: str, channel: grpc.Channel, proc: subprocess.Popen[bytes], timeout: float, log: Callable[[], str]
) -> None:
    """Waits until the process's gRPC health check says SERVING; fails with its log if it dies."""
    health = health_pb2_grpc.HealthStub(channel)

    def serving() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()}")
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    eventually(serving, within=timeout, what=f"{what} serving", ignoring=(grpc.RpcError,), describe=log)


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int) -> int:
    """Signals a process and reaps it; killed outright if it has not exited after 15 s."""
    if proc is None:
        return 0
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How a client dials a TLS balancer: the CA it trusts, and a certificate for mTLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def node_env(self) -> dict[str, str]:
        env = {"XLLM_TLS_CA": str(self.ca)}
        if self.cert is not None and self.key is not None:
            env |= {"XLLM_TLS_CERT": str(self.cert), "XLLM_TLS_KEY": str(self.key)}
        return env


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _SyncKey(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """The blocking stubs' twin of ``common.channels``' key interceptor: a bearer key on every call."""

    def __init__(self, api_key: str) -> None:
        self._metadata = bearer_metadata(api_key)

    def _details(self, d: Any) -> _CallDetails:
        metadata = tuple(d.metadata or ()) + self._metadata
        return _CallDetails(
            d.method, d.timeout, metadata, d.credentials, getattr(d, "wait_for_ready", None), d.compression
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def sync_channel(address: str, api_key: str = "", tls: ClientTls | None = None) -> grpc.Channel:
    """A blocking channel presenting ``api_key`` (none: no key), over TLS when ``tls`` is given."""
    creds = client_credentials(tls.ca, tls.cert, tls.key) if tls is not None else None
    if creds is None:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    return grpc.intercept_channel(channel, _SyncKey(api_key)) if api_key else channel


_STARTED: dict[str, BalancerProcess] = {}  # address -> balancer, for helpers given only an address


class BalancerProcess:
    """One `llmlb serve` process; stop/start again on the same home to test restarts.

    ``registry`` and ``manifest`` call it with the admin key it wrote on its first start.
    """

    def __init__(self, home: Path, env: dict[str, str], tls: ClientTls | None = None) -> None:
        self.home = home
        self.env = env
        self.tls = tls
        self.port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.log_path = home / "balancer.log"
        self.admin_key = ""
        self._node_key = ""
        # host:port of /metrics of the node ``packaged_models_fleet`` starts beside it; empty otherwise.
        self.node_metrics = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> None:
        env = {
            **os.environ,
            "LLMLB_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
            **self.env,
            "LLMLB_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
        }
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "balancer.cli", "serve", "--grpc-listen", self.address],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with sync_channel(self.address, tls=self.tls) as health_channel:
            wait_serving("balancer", health_channel, self.proc, timeout, self.log)
        # Absent when the balancer runs with LLMLB_AUTH=off, or is given its admin key (LLMLB_ADMIN_KEY).
        key_file = self.home / "admin-key"
        self.admin_key = (
            key_file.read_text().strip() if key_file.exists() else self.env.get("LLMLB_ADMIN_KEY", "")
        )
        self.channel = sync_channel(self.address, self.admin_key, self.tls)
        _STARTED[self.address] = self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        code = stop_process(self.proc, sig)
        self.proc = None
        return code

    @property
    def node_key(self) -> str:
        """A node-scoped key, minted through CreateKey on first use and reused (it outlives restarts)."""
        if not self._node_key and self.admin_key:
            reply = self.registry.CreateKey(
                rpb.CreateKeyRequest(name="test-nodes", scopes=[pb.SCOPE_NODE]), timeout=10
            )
            self._node_key = reply.secret
        return self._node_key

    def node_env(self) -> dict[str, str]:
        """What a node (or an `xllm` command) needs to reach this balancer: its key, its TLS trust."""
        env = {"XLLM_API_KEY": self.node_key} if self.node_key else {}
        return env | (self.tls.node_env() if self.tls is not None else {})

    def aio_channel(self, api_key: str | None = None) -> grpc.aio.Channel:
        """An asyncio channel to this balancer with ``api_key`` (default: the admin key)."""
        tls = self.tls
        return open_channel(
            self.address,
            api_key=self.admin_key if api_key is None else api_key,
            tls_ca=tls.ca if tls else None,
            tls_cert=tls.cert if tls else None,
            tls_key=tls.key if tls else None,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def registry(self) -> registry_pb2_grpc.RegistryStub:
        assert self.channel is not None
        return registry_pb2_grpc.RegistryStub(self.channel)

    @property
    def manifest(self) -> manifest_pb2_grpc.ManifestStub:
        assert self.channel is not None
        return manifest_pb2_grpc.ManifestStub(self.channel)


def balancer_channel(address: str) -> grpc.aio.Channel:
    """An asyncio channel to the test balancer at ``address``, presenting its admin key."""
    return _STARTED[address].aio_channel()


@pytest.fixture
def balancer_factory(tmp_path: Path) -> Iterator[object]:
    started: list[BalancerProcess] = []

    def make(
        hub: FakeHub, *, token: bool = False, tls: ClientTls | None = None, **extra_env: str
    ) -> BalancerProcess:
        env = {"HF_ENDPOINT": hub.url, "LLMLB_LOG_FORMAT": "json", **extra_env}
        if token:
            env["HF_TOKEN"] = hub.token
        proc = BalancerProcess(tmp_path / f"balancer{len(started)}", env, tls)
        started.append(proc)
        proc.start()
        return proc

    yield make
    for proc in started:
        proc.stop()
        _STARTED.pop(proc.address, None)


@pytest.fixture
def balancer(balancer_factory, hub: FakeHub) -> BalancerProcess:
    """A balancer whose origin is the fake hub, without an HF token."""
    return balancer_factory(hub)  # type: ignore[no-any-return,operator]


class NodeProcess:
    """One `xllm serve` process on 127.0.0.1, talking to a balancer; restartable on the same dirs."""

    def __init__(
        self,
        home: Path,
        balancer: str,
        env: dict[str, str],
        args: list[str],
        command: Sequence[str] = ("serve",),
    ) -> None:
        self.home = home
        self.command = list(command)  # empty: plain `xllm`, which serves too
        self.balancer = balancer
        self.env = env
        self.args = args
        self.port = free_port()
        self.models_dir = home / "models"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / "node.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "LLMLB_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "node.cli",
                    *self.command,
                    "--grpc-listen",
                    self.address,
                    "--balancer",
                    self.balancer,
                    "--models-dir",
                    str(self.models_dir),
                    "--log-format",
                    self.env.get("XLLM_LOG_FORMAT", "json"),
                    *self.args,
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with grpc.insecure_channel(self.address) as channel:
            wait_serving("node", channel, self.proc, timeout, self.log)

    @property
    def node_id(self) -> str:
        """The id the node saved on registering, which comes after its health check already answers."""
        saved = self.home / "node-id"
        eventually(saved.exists, 30, f"the node's id saved in {saved}", describe=self.log)
        return saved.read_text().strip()

    def direct_channel(self) -> grpc.Channel:
        """A blocking channel to this node's own port, presenting its ``XLLM_AUTH_TOKEN``.

        A node refuses callers the fleet does not vouch for, so a test that calls one directly starts
        it with a token (``DIRECT_TOKEN``), as an operator would.
        """
        token = self.env.get("XLLM_AUTH_TOKEN", "")
        assert token, "start the node with XLLM_AUTH_TOKEN=DIRECT_TOKEN to call it directly"
        return sync_channel(self.address, token)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = stop_process(self.proc, sig)
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _xllm_env(home: Path, args: Sequence[str], env: dict[str, str] | None) -> dict[str, str]:
    """The command's environment; pointed at a test balancer (``--balancer``), it gets that one's key."""
    reach: dict[str, str] = {}
    if "--balancer" in args[:-1]:
        balancer = _STARTED.get(args[args.index("--balancer") + 1])
        if balancer is not None:
            reach = balancer.node_env()
    return {**os.environ, **reach, **(env or {}), "LLMLB_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def llmlb(
    *args: str, home: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """One `llmlb` command as its own process; the key comes from ``home``/admin-key unless ``env`` or
    a flag gives one."""
    return subprocess.run(
        [sys.executable, "-m", "balancer.cli", *args],
        cwd=ROOT,
        env={**os.environ, "LLMLB_HOME": str(home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def xllm(
    home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Runs one `xllm` command (pull, models, ...) as its own process."""
    full_env = _xllm_env(home, args, env)
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def xllm_start(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Starts one `xllm` command as its own process and returns at once."""
    full_env = _xllm_env(home, args, env)
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[object]:
    started: list[NodeProcess] = []

    def make(
        balancer: BalancerProcess, hub: FakeHub, *args: str, start: bool = True, **extra_env: str
    ) -> NodeProcess:
        env = {"HF_ENDPOINT": hub.url, "XLLM_LOG_FORMAT": "json", **balancer.node_env(), **extra_env}
        node = NodeProcess(tmp_path / f"node{len(started)}", balancer.address, env, list(args))
        started.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in started:
        node.stop()


def online(balancer: BalancerProcess) -> set[str]:
    """Ids of the nodes the balancer lists online."""
    nodes = balancer.registry.ListNodes(rpb.ListNodesRequest(), timeout=10).nodes
    return {n.id for n in nodes if n.state == pb.NODE_STATE_ONLINE}


def wait_online(balancer: BalancerProcess, *nodes: NodeProcess, within: float = 30.0) -> None:
    """Waits until the balancer lists every one of ``nodes`` online (each saves its id on registering)."""
    eventually(lambda: all((n.home / "node-id").exists() for n in nodes), within, "saved node ids")
    want = {n.node_id for n in nodes}
    eventually(lambda: want <= online(balancer), within, f"nodes {sorted(want)} online")


def pending_commands(balancer: BalancerProcess, node_id: str) -> list[tuple[str, str]]:
    """The commands the balancer still holds for a node, read from its database (read-only)."""
    uri = f"file:{balancer.home / 'llmlb.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
        rows = db.execute("SELECT kind, model_id FROM node_commands WHERE node_id = ?", (node_id,))
        return [(str(kind), str(model)) for kind, model in rows]


@contextlib.contextmanager
def packaged_models_fleet(root: Path) -> Iterator[BalancerProcess]:
    """A balancer and one node serving the packaged models' dir (``CACHE``), online, for a whole module;
    the node's ``/metrics`` is at the balancer's ``node_metrics``.

    Module-scoped fixtures outlive the per-test hermetic environment, so this makes its own alike. Ask
    for the model's fixture (``gemma``, ...) first: it lays the packaged files out in ``CACHE``.
    """
    with pytest.MonkeyPatch.context() as env, FakeHub() as hub:
        for name in list(os.environ):
            if name.startswith(("LLMLB_", "XLLM_", "HF_", "HUGGING_FACE")) or name == "LLM_MODELS_DIR":
                env.delenv(name, raising=False)
        env.setenv("HOME", str(root / "home"))
        balancer = BalancerProcess(root / "balancer", {"HF_ENDPOINT": hub.url, "LLMLB_LOG_FORMAT": "json"})
        balancer.start()
        node_env = {"HF_ENDPOINT": hub.url, "XLLM_LOG_FORMAT": "json", **balancer.node_env()}
        balancer.node_metrics = f"127.0.0.1:{free_port()}"
        node_args = ["--shared-dir", str(CACHE), "--metrics-listen", balancer.node_metrics]
        node = NodeProcess(root / "node", balancer.address, node_env, node_args)
        try:
            node.start()
            wait_online(balancer, node)
            yield balancer
        finally:
            node.stop()
            balancer.stop()
