"""Ports for test and bench processes that are told where to listen before they start.

Asking the kernel for port 0 and handing the number to a child process races: the port is free when
asked, but the kernel hands the same ephemeral range to every outgoing connection (gRPC channels,
HTTP clients, PostgreSQL), so by the time the child binds, one of those may hold it ("address already
in use"). The ports here come from below the kernel's ephemeral range, where outgoing connections never
land, at random, and never twice from one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000
_given: set[int] = set()


def _ephemeral_floor() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default, and what other systems use by and large


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and that no outgoing connection will take."""
    floor = _ephemeral_floor()
    if floor - _LOWEST >= 1_000:
        for _ in range(200):
            port = random.randrange(_LOWEST, floor)
            if port not in _given and _bindable(port):
                _given.add(port)
                return port
    # An ephemeral range reaching down this far leaves no quiet band: ask the kernel.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _given.add(port)
    return port
