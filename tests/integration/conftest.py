"""Real processes on 127.0.0.1: a balancer started with the `llmlb serve` entry point."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb.llmlb.v1 import manifest_pb2_grpc, registry_pb2_grpc
from common.rpc import CHANNEL_OPTIONS
from tests.fixtures.fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(
    what: str, channel: grpc.Channel, proc: subprocess.Popen[bytes], timeout: float, log: Callable[[], str]
) -> None:
    """Waits until the process's gRPC health check says SERVING; fails with its log if it dies."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()}")
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not serving after {timeout}s:\n{log()}")
        time.sleep(0.1)


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


class BalancerProcess:
    """One `llmlb serve` process; stop/start again on the same home to test restarts."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.log_path = home / "balancer.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, **self.env, "LLMLB_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        self.home.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balancer.cli", "serve", "--grpc-listen", self.address],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        wait_serving("balancer", self.channel, self.proc, timeout, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        code = stop_process(self.proc, sig)
        self.proc = None
        return code

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


@pytest.fixture
def balancer_factory(tmp_path: Path) -> Iterator[object]:
    started: list[BalancerProcess] = []

    def make(hub: FakeHub, *, token: bool = False, **extra_env: str) -> BalancerProcess:
        env = {"HF_ENDPOINT": hub.url, "LLMLB_LOG_FORMAT": "json", **extra_env}
        if token:
            env["HF_TOKEN"] = hub.token
        proc = BalancerProcess(tmp_path / f"balancer{len(started)}", env)
        started.append(proc)
        proc.start()
        return proc

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def balancer(balancer_factory, hub: FakeHub) -> BalancerProcess:
    """A balancer whose origin is the fake hub, without an HF token."""
    return balancer_factory(hub)  # type: ignore[no-any-return,operator]


class NodeProcess:
    """One `xllm serve` process on 127.0.0.1, talking to a balancer; restartable on the same dirs."""

    def __init__(self, home: Path, balancer: str, env: dict[str, str], args: list[str]) -> None:
        self.home = home
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
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "serve",
                "--grpc-listen",
                self.address,
                "--balancer",
                self.balancer,
                "--models-dir",
                str(self.models_dir),
                "--log-format",
                "json",
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
        return (self.home / "node-id").read_text().strip()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = stop_process(self.proc, sig)
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def xllm(
    home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Runs one `xllm` command (pull, models, ...) as its own process."""
    full_env = {**os.environ, **(env or {}), "LLMLB_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def xllm_start(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {**os.environ, **(env or {}), "LLMLB_HOME": str(home), "PYTHONUNBUFFERED": "1"}
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
        env = {"HF_ENDPOINT": hub.url, "XLLM_LOG_FORMAT": "json", **extra_env}
        node = NodeProcess(tmp_path / f"node{len(started)}", balancer.address, env, list(args))
        started.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in started:
        node.stop()
