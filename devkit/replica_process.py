"""``llmlb serve`` replicas as processes on 127.0.0.1, for the replica benchmarks.

Each replica has its own home and ports, kept across restarts, so a replica killed and started again
comes back where its clients and nodes look for it. Auth is on; logs are JSON at warning level in
``<home>/serve.log``, so a report can count the warnings by event.

```python
async with replica_pair(server, root) as (a, b, admin_key):  # on a fresh database, A first
    a.stop(signal.SIGKILL)
    a.start()
    await a.wait_ready()
```
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc.aio
import httpx

from common.channels import bearer_metadata
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import CHANNEL_OPTIONS
from devkit.ports import free_port
from devkit.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0


class ReplicaProcess:
    """One ``llmlb serve`` process on a shared database; ``start`` again after ``stop`` to restart it."""

    def __init__(
        self, name: str, home: Path, database_url: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.home = home
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.env = {
            **os.environ,
            "LLMLB_HOME": str(home),
            "LLMLB_DATABASE_URL": database_url,
            "LLMLB_GRPC_LISTEN": self.address,
            "LLMLB_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
            "LLMLB_BULK_PORT": "0",  # several replicas on this host: not the fixed default port
            "LLMLB_AUTH": "on",
            "LLMLB_LOG_LEVEL": "warning",
            "LLMLB_LOG_FORMAT": "json",  # so the report can count the warnings by event
            "HF_ENDPOINT": "http://127.0.0.1:9",  # never the real hub, unless the caller names another
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / "serve.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Starts the process and returns at once (see :meth:`wait_ready`); the log is appended to."""
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "balancer.cli", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    async def wait_ready(self, within: float = START_TIMEOUT_S) -> None:
        """Until ``/readyz`` answers 200 (the store answers); fails if the process exits first."""
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(base_url=self.http_url, timeout=2) as client:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"replica {self.name} exited: {self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/readyz")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica {self.name} not ready in {within:.0f} s: {self.log_tail()}")
                await asyncio.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signals the process and reaps it; killed outright if it has not exited after 15 s."""
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def warnings(self) -> Counter[str]:
        """How many times each event was logged (at warning and above, the level it runs at)."""
        events: Counter[str] = Counter()
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    events[str(json.loads(line).get("event", "?"))] += 1
        return events

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""


async def create_key(replica: ReplicaProcess, admin: str, name: str, scope: pb.Scope.ValueType) -> str:
    """A new API key's secret, made through ``replica``'s Registry with the admin key ``admin``."""
    async with grpc.aio.insecure_channel(replica.address, options=CHANNEL_OPTIONS) as channel:
        reply = await rgrpc.RegistryStub(channel).CreateKey(
            rpb.CreateKeyRequest(name=name, scopes=[scope]), timeout=10, metadata=bearer_metadata(admin)
        )
    return str(reply.secret)


@contextlib.asynccontextmanager
async def replica_pair(
    server: PostgresServer, root: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[ReplicaProcess, ReplicaProcess, str]]:
    """Replicas A and B on a new database, and the admin key; A starts first so it alone migrates the
    store and mints the key. Both are stopped on exit."""
    url = server.url(server.create_database())
    started: list[ReplicaProcess] = []
    try:
        for name in ("A", "B"):
            started.append(ReplicaProcess(name, root / name, url, env))
            started[-1].start()
            await started[-1].wait_ready()
        key = (root / "A" / "admin-key").read_text().strip()
        yield started[0], started[1], key
    finally:
        for replica in started:
            replica.stop()
