"""``llmlb serve --workers N``: replicas on one host sharing its ports, under a supervisor that starts
again a worker that dies and stops them all on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable
from pathlib import Path

import httpx
import pytest

from balancer.store import Store
from devkit.echo_node import EchoNode
from devkit.fake_hub import FakeHub
from tests.fixtures.eventually import eventually, eventually_async
from tests.integration.conftest import BalancerProcess, llmlb

pytestmark = pytest.mark.timeout(180)


def workers_of(supervisor: BalancerProcess) -> list[int]:
    """The pids of the supervisor's worker processes."""
    assert supervisor.proc is not None
    pid = supervisor.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(c) for c in children)


def running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def chat_on_fresh_connections(supervisor: BalancerProcess, count: int) -> list[int]:
    """``count`` chat requests, each on a new connection, so the kernel spreads them over the workers."""
    codes = []
    for _ in range(count):
        with httpx.Client(base_url=supervisor.http_url, timeout=30) as client:
            reply = client.post(
                "/v1/chat/completions",
                json={"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {supervisor.admin_key}"},
            )
            codes.append(reply.status_code)
    return codes


async def replicas_recorded(url: str) -> list[str]:
    store = await Store.open(url)
    try:
        return await store.replicas()
    finally:
        await store.close()


async def _two(recorded: Awaitable[list[str]]) -> bool:
    return len(await recorded) == 2


async def test_two_workers_share_the_ports_one_that_dies_is_started_again_and_sigterm_stops_all(
    tmp_path: Path, postgres_url: str, hub: FakeHub
) -> None:
    env = {"LLMLB_DATABASE_URL": postgres_url, "LLMLB_WORKERS": "2", "HF_ENDPOINT": hub.url}
    supervisor = BalancerProcess(tmp_path / "host", env)
    await asyncio.to_thread(supervisor.start)
    try:
        first = await asyncio.to_thread(
            eventually, lambda: len(workers_of(supervisor)) == 2, 30, "two workers"
        )
        assert first
        pids = workers_of(supervisor)
        # The supervisor is ready when one worker answers; each worker is a replica once it beats.
        await eventually_async(
            lambda: _two(replicas_recorded(postgres_url)), 60, "both workers recorded as replicas", every=0.5
        )
        async with EchoNode(supervisor.address, api_key=supervisor.admin_key, node_id="n1"):
            assert await asyncio.to_thread(chat_on_fresh_connections, supervisor, 12) == [200] * 12

            os.kill(pids[0], signal.SIGKILL)

            def replaced() -> bool:
                now = workers_of(supervisor)
                return len(now) == 2 and pids[0] not in now and pids[1] in now

            await asyncio.to_thread(eventually, replaced, 30, "the killed worker started again")
            # Until the new worker binds, the survivor takes every connection; then both do.
            assert await asyncio.to_thread(chat_on_fresh_connections, supervisor, 12) == [200] * 12
        survivors = workers_of(supervisor)
    finally:
        code = await asyncio.to_thread(supervisor.stop, signal.SIGTERM)
    assert code == 0
    assert not [pid for pid in survivors if running(pid)]  # every worker stopped


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"LLMLB_WORKERS": "2"}, "needs a PostgreSQL store"),
        ({"LLMLB_WORKERS": "0"}, "LLMLB_WORKERS"),
    ],
)
def test_workers_are_refused_where_they_cannot_work(tmp_path: Path, env: dict[str, str], why: str) -> None:
    done = llmlb("serve", "--grpc-listen", "127.0.0.1:1", home=tmp_path, env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "configuration error" in done.stderr and why in done.stderr, done.stderr


def test_workers_need_fixed_ports(tmp_path: Path, postgres_url: str) -> None:
    done = llmlb(
        "serve",
        "--workers",
        "2",
        "--grpc-listen",
        "127.0.0.1:0",
        home=tmp_path,
        env={"LLMLB_DATABASE_URL": postgres_url},
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "fixed ports" in done.stderr, done.stderr
