"""An executor that runs each call on a thread of its own, which ends when the call does.

llama.cpp's CPU backend (and CTranslate2's) parallelise with OpenMP, which keeps a team of worker
threads for every thread that has ever called into it, for as long as that thread lives. Once the teams'
threads outnumber the cores, OpenMP makes every team spin far less between steps, and each step then
pays for waking sleeping threads: on a 2-core node, generation that a long-lived pool had spread over
two calling threads ran about 30 % slower than from one. A thread that ends takes its team with it,
so here only the calls in progress hold one. Starting a thread costs tens of microseconds, nothing
against a model call.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class FreshThreadExecutor(Executor):
    """At most ``limit`` calls at once, each on a new thread; the rest wait in order."""

    def __init__(self, limit: int, name: str) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._name = name
        self._ids = itertools.count()
        self._queue: deque[_Call] = deque()
        self._running = 0
        self._shut = False
        self._changed = threading.Condition()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._changed:
            if self._shut:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.append((future, fn, args, kwargs))
            self._start_waiting()
        return future

    @property
    def running(self) -> int:
        """Calls in progress now (each on its own thread)."""
        with self._changed:
            return self._running

    def _start_waiting(self) -> None:
        # Called with the condition's lock held.
        while self._running < self._limit and self._queue:
            call = self._queue.popleft()
            self._running += 1
            threading.Thread(target=self._run, args=(call,), name=f"{self._name}-{next(self._ids)}").start()

    def _run(self, call: _Call) -> None:
        future, fn, args, kwargs = call
        try:
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # delivered to the caller, as ThreadPoolExecutor does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
        finally:
            with self._changed:
                self._running -= 1
                self._start_waiting()
                self._changed.notify_all()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._changed:
            self._shut = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            if wait:
                self._changed.wait_for(lambda: self._running == 0 and not self._queue)
