"""The walk of one request through the balancer's modules, recorded with a profiler hook.

``Recorder`` (for ``sys.setprofile``) records every call and return in the project's own modules;
``walk_of`` reads from them the walk from a door's handler to the router's first call, in the request's
own task. A module is *left* once no frame of it remains (a coroutine suspended at an ``await`` is
still on the walk); *re-entered* is a new call into a module that was left. ``bench/bench_walk.py``
measures a chat request through each door with it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "call" (a new frame, or a coroutine resumed) or "return" (returned, or suspended)
    module: str
    function: str
    task: int
    frame: int


@dataclass
class Walk:
    modules: list[str] = field(default_factory=list)
    reentries: list[str] = field(default_factory=list)


class Recorder:
    """Calls and returns in the project's modules (generated protobuf code left out)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("call", "return"):
            return
        path = frame.f_code.co_filename
        if not path.startswith(str(ROOT)) or "/pb/" in path:
            return
        module = path[len(str(ROOT)) + 1 : -3].replace("/", ".")
        if not module.startswith(("balancer.", "common.")):
            return
        try:
            task = id(asyncio.current_task())
        except RuntimeError:
            task = 0
        self.events.append(Event(event, module, frame.f_code.co_name, task, id(frame)))


def walk_of(events: list[Event], door: str) -> Walk:
    """The walk from ``door``'s first call to the router's first call (see the module's text)."""
    start = next(i for i, e in enumerate(events) if e.module == door and e.kind == "call")
    task = events[start].task
    last = {(e.frame, e.function, e.module): i for i, e in enumerate(events)}
    seen: set[tuple[int, str, str]] = set()
    alive: Counter[str] = Counter()
    left: set[str] = set()
    walk = Walk()
    for i in range(start, len(events)):
        e = events[i]
        if e.module.startswith("balancer.router."):
            break
        if e.task != task:
            continue
        key = (e.frame, e.function, e.module)
        if e.kind == "call" and key not in seen:
            seen.add(key)
            if e.module in left:
                walk.reentries.append(f"{e.module}.{e.function}")
                left.discard(e.module)
            if e.module not in walk.modules:
                walk.modules.append(e.module)
            alive[e.module] += 1
        elif e.kind == "return" and last[key] == i:  # its last return: the frame is done
            alive[e.module] -= 1
            if alive[e.module] <= 0:
                alive[e.module] = 0
                left.add(e.module)
    return walk
