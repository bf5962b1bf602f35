"""The walk measure of ``devkit/request_walk.py``: what counts as leaving a module and entering it again."""

from __future__ import annotations

from devkit.request_walk import Event, walk_of

DOOR = "balancer.http.openai_routes"


def ev(kind: str, module: str, function: str, frame: int, task: int = 1) -> Event:
    return Event(kind, module, function, task, frame)


def test_a_module_called_again_after_its_frames_returned_is_a_reentry() -> None:
    events = [
        ev("call", DOOR, "handler", 1),
        ev("call", "balancer.edge.plane", "open", 2),
        ev("return", "balancer.edge.plane", "open", 2),  # the plane is left
        ev("call", "balancer.http.openai_requests", "parse", 3),
        ev("return", "balancer.http.openai_requests", "parse", 3),
        ev("call", "balancer.edge.plane", "whole", 4),  # ... and entered again
        ev("call", "balancer.router.routing", "chat_whole", 5),
    ]
    walk = walk_of(events, DOOR)
    assert walk.modules == [DOOR, "balancer.edge.plane", "balancer.http.openai_requests"]
    assert walk.reentries == ["balancer.edge.plane.whole"]


def test_a_suspended_coroutine_stays_on_the_walk_and_other_tasks_do_not_count() -> None:
    events = [
        ev("call", DOOR, "handler", 1),
        ev("call", "balancer.edge.plane", "whole", 2),
        ev("return", "balancer.edge.plane", "whole", 2),  # suspended at an await: it comes back
        ev("call", "balancer.edge.observe", "heartbeat", 9, task=2),  # another task's work
        ev("call", "balancer.edge.plane", "whole", 2),  # resumed: the same frame, not a new entry
        ev("call", "balancer.edge.plane", "_admitted", 3),
        ev("call", "balancer.router.routing", "chat_whole", 4),
        ev("call", "balancer.edge.plane", "late", 6),  # past the router: not part of the walk
    ]
    walk = walk_of(events, DOOR)
    assert walk.modules == [DOOR, "balancer.edge.plane"]
    assert walk.reentries == []
