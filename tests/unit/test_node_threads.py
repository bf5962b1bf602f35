"""FreshThreadExecutor: each call on a thread of its own that ends with it, at most ``limit`` at once."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError

import pytest

from node.threads import FreshThreadExecutor


def test_each_call_runs_on_a_new_thread_that_ends_with_it() -> None:
    executor = FreshThreadExecutor(2, "t")
    threads = [executor.submit(threading.current_thread).result(timeout=5) for _ in range(3)]
    executor.shutdown()

    assert len({id(t) for t in threads}) == 3
    assert threading.main_thread() not in threads
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive()
    assert [t.name for t in threads] == ["t-0", "t-1", "t-2"]


def test_at_most_limit_calls_run_at_once_and_the_rest_start_in_order() -> None:
    executor = FreshThreadExecutor(2, "t")
    lock = threading.Lock()
    running, most, started = 0, 0, []

    def call(i: int) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            started.append(i)
        time.sleep(0.05)
        with lock:
            running -= 1

    futures = [executor.submit(call, i) for i in range(6)]
    for future in futures:
        future.result(timeout=5)
    executor.shutdown()

    assert most == 2
    assert sorted(started[:2]) == [0, 1] and sorted(started[2:4]) == [2, 3]
    assert executor.running == 0


def test_a_failure_reaches_the_caller_and_frees_its_place() -> None:
    executor = FreshThreadExecutor(1, "t")

    def boom() -> None:
        raise ValueError("engine said no")

    with pytest.raises(ValueError, match="engine said no"):
        executor.submit(boom).result(timeout=5)
    assert executor.submit(lambda: 7).result(timeout=5) == 7
    executor.shutdown()


def test_shutdown_cancels_what_waits_waits_for_what_runs_and_refuses_more() -> None:
    executor = FreshThreadExecutor(1, "t")
    release = threading.Event()
    running = executor.submit(release.wait, 5)
    waiting = executor.submit(lambda: "never")
    threading.Timer(0.1, release.set).start()

    executor.shutdown(wait=True, cancel_futures=True)

    assert running.done() and running.result() is True
    with pytest.raises(CancelledError):
        waiting.result(timeout=0)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(lambda: None)


async def test_the_event_loop_awaits_calls_on_it() -> None:
    executor = FreshThreadExecutor(1, "t")
    loop = asyncio.get_running_loop()
    name = await loop.run_in_executor(executor, lambda: threading.current_thread().name)
    assert name == "t-0"
    executor.shutdown()
