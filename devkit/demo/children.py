"""The demo's child processes (a balancer and a node): started in their own sessions, watched, stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from common.errors import ErrorCode, LlmlbError

T = TypeVar("T")
START_TIMEOUT_S = 60.0  # for each child to come up
STOP_TIMEOUT_S = 30.0  # for each child to exit after SIGTERM before it is killed
# Settings that would point the demo's processes at other state, ports, keys or TLS than its own.
NOT_INHERITED = (
    "LLMLB_ADDR",
    "LLMLB_API_KEY",
    "LLMLB_AUTH",
    "LLMLB_CATALOG",
    "LLMLB_DATABASE_URL",
    "LLMLB_GRPC_LISTEN",
    "LLMLB_HTTP_LISTEN",
    "LLMLB_TLS_CA",
    "LLMLB_TLS_CERT",
    "LLMLB_TLS_KEY",
    "LLMLB_TLS_CLIENT_CA",
    "LLMLB_TLS_CLIENT_CERT",
    "LLMLB_TLS_CLIENT_KEY",
    "LLM_MODELS_DIR",
    "XLLM_ADVERTISE",
    "XLLM_API_KEY",
    "XLLM_BALANCER",
    "XLLM_GRPC_LISTEN",
    "XLLM_METRICS_LISTEN",
    "XLLM_MODELS_DIR",
    "XLLM_NODE_ID",
    "XLLM_SHARED_DIR",
    "XLLM_TLS_CA",
    "XLLM_TLS_CERT",
    "XLLM_TLS_KEY",
)


@dataclass(slots=True)
class Child:
    """A process the demo started, in its own session so Ctrl-C in the terminal reaches only the demo."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def exited(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    async def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return await asyncio.to_thread(self.proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return await asyncio.to_thread(self.proc.wait)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def dial(listen: str) -> str:
    """The address to dial for a listen address: a wildcard host is reached on loopback."""
    host, _, port = listen.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "[::]", "") else listen


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment less ``NOT_INHERITED``, with the child's own home and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    return {**env, "LLMLB_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


def start(name: str, args: list[str], env: dict[str, str], log_path: Path) -> Child:
    """Runs ``python -m <args>`` with its output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Child(name, proc, log_path)


def failed_child(child: Child) -> LlmlbError:
    """The error that ends the demo when ``child`` exited: its status and the tail of its log."""
    return LlmlbError(
        ErrorCode.INTERNAL,
        f"the {child.name} exited with status {child.exited()}; its log ({child.log_path}) ends:\n"
        + child.log_tail(),
    )


def check_alive(children: list[Child]) -> None:
    """Raises ``failed_child`` for the first child that has exited."""
    for child in children:
        if child.exited() is not None:
            raise failed_child(child)


async def until(
    what: str, check: Callable[[], Awaitable[T]], children: list[Child], limit_s: float = START_TIMEOUT_S
) -> T:
    """Polls ``check`` until it returns something truthy; fails at once if a child dies."""
    deadline = time.monotonic() + limit_s
    while True:
        check_alive(children)
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            logs = ", ".join(str(c.log_path) for c in children)
            raise LlmlbError(ErrorCode.TIMEOUT, f"{what} not within {limit_s:g} s; see {logs}")
        await asyncio.sleep(0.2)
