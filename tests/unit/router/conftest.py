"""Shared pieces for the routing-rule tests: a clock the test moves by hand."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest


class FakeClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Lets other tasks run until ``condition`` holds; fails if it never does."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never came to pass: {what}")
