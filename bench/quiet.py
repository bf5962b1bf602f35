"""Rounds measured on a shared machine: a round during which other processes took the cores is run again.

llama.cpp's threads wait for each other at every step, so a neighbour taking part of one core slows
generation several-fold; such a round measures the neighbour, not the path being measured.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

QUIET_CORES = 0.2  # a round during which other processes used more CPU than this is run again
REPEAT_ROUND = 2  # repeats of one round: a neighbour that stays is part of the machine
REPEAT_BUDGET = 10  # repeats in all, so a busy machine cannot stretch the run without bound
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

Round = Callable[[], Awaitable[tuple[int, float]]]  # one generation: (tokens, seconds)


def _cpu_now(pids: tuple[int, ...]) -> tuple[float, float, float]:
    """CPU seconds so far: the whole machine's busy time, this process's, and that of ``pids``.

    From /proc (Linux); elsewhere the machine's figure is 0, so no round counts as disturbed.
    """
    own = time.process_time()
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        theirs = 0
        for pid in pids:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            theirs += int(stat[11]) + int(stat[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return 0.0, own, 0.0
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / _TICKS, own, theirs / _TICKS


@dataclass(slots=True)
class QuietRounds:
    """Measures rounds, running one again while other processes took the cores (within a budget)."""

    pids: tuple[int, ...] = ()  # the benchmark's own other processes: not neighbours
    repeats: int = 0
    others: list[float] = field(default_factory=list)  # cores other processes used, per kept round

    async def measure(self, one: Round) -> tuple[int, float, float]:
        """One round: tokens, wall seconds, and this process's CPU seconds during it."""
        tries = 0
        while True:
            before = _cpu_now(self.pids)
            n, seconds = await one()
            busy, own, ours = (a - b for a, b in zip(_cpu_now(self.pids), before, strict=True))
            others = max(0.0, busy - own - ours) / seconds
            if others <= QUIET_CORES or tries == REPEAT_ROUND or self.repeats >= REPEAT_BUDGET:
                self.others.append(others)
                return n, seconds, own
            tries += 1
            self.repeats += 1
            await asyncio.sleep(1.0)  # let the neighbour's burst pass

    @staticmethod
    def method(ours: str) -> str:
        """How rounds are kept, for a report; ``ours`` names the processes not counted as others."""
        return (
            f"A round during which other processes used more than {QUIET_CORES} of a core (from "
            f"/proc/stat, less {ours}) is run again after a second's pause, at most {REPEAT_ROUND} times "
            f"per round and {REPEAT_BUDGET} in all: llama.cpp's threads wait for each other at every "
            "step, so a neighbour slows generation several-fold."
        )

    def summary(self) -> str:
        return (
            f"- rounds run again because other processes took the cores: {self.repeats}"
            + (" (the budget ran out)" if self.repeats >= REPEAT_BUDGET else "")
            + f"; other processes used {statistics.median(self.others):.2f} (median), "
            f"{max(self.others):.2f} (max) of a core during the rounds kept"
        )
