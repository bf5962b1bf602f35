"""CPU time of processes on this machine, read from /proc (Linux), for the benchmarks' reports.

A ``CpuMeter`` turns readings at the start and end of a window into shares of one core per named
process, with PostgreSQL (its postmaster and every backend) and the whole machine alongside.

```python
meter = CpuMeter({"replica A": a_pid, "node 1": node_pid}, postmaster)
meter.start()
...
meter.swap("replica A", None)  # before A is killed: its CPU so far is kept
meter.swap("replica A", restarted_pid)  # the name now follows the new process
shares = meter.shares()  # {"replica A": 0.42, ..., "PostgreSQL": 0.1, "whole machine": 1.7}
```
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int, *, with_children: bool = False) -> float:
    """CPU seconds ``pid`` used so far (with the children it has reaped, if asked); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def postgres_cpu_s(postmaster: int) -> float:
    """The whole PostgreSQL server: the postmaster, its live backends and the ones that have exited."""
    total = proc_cpu_s(postmaster, with_children=True)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    total += proc_cpu_s(int(entry.name))
    return total


def machine_busy_s() -> float:
    """CPU seconds every core of the machine has been busy (all but idle and iowait)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS


@dataclass(slots=True)
class CpuMeter:
    """CPU shares of one core over a window, per named process (and PostgreSQL and the machine)."""

    pids: dict[str, int | None]  # None: the name has no process right now
    postmaster: int
    _start: dict[str, float] = field(default_factory=dict)
    _banked: dict[str, float] = field(default_factory=dict)  # CPU of a name's earlier processes
    _at: float = 0.0

    def _one(self, name: str) -> float:
        pid = self.pids[name]
        return self._banked.get(name, 0.0) + (proc_cpu_s(pid) if pid is not None else 0.0)

    def _now(self) -> dict[str, float]:
        now = {name: self._one(name) for name in self.pids}
        now["PostgreSQL"] = postgres_cpu_s(self.postmaster)
        now["whole machine"] = machine_busy_s()
        return now

    def start(self) -> None:
        self._start, self._at = self._now(), time.monotonic()

    def swap(self, name: str, pid: int | None) -> None:
        """``name`` follows ``pid`` from now on; what its current process used so far is kept.

        Call it before that process is killed: once it is reaped, /proc no longer has its CPU time.
        """
        self._banked[name] = self._one(name)
        self.pids[name] = pid

    def shares(self) -> dict[str, float]:
        """Each name's CPU since :meth:`start` as a share of one core."""
        wall = time.monotonic() - self._at
        return {name: (cpu - self._start[name]) / wall for name, cpu in self._now().items()}
