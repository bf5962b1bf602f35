"""Where each model stands on this node, as the balancer is told: absent, downloading, present, ...

The resolver and the downloader write here; the balancer link reads the whole picture for each
heartbeat and is told of every change, so progress reaches the balancer between heartbeats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

ABSENT = "absent"
DOWNLOADING = "downloading"
PRESENT = "present"
LOADING = "loading"
READY = "ready"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ModelState:
    model_id: str
    state: str = ABSENT
    downloaded_bytes: int = 0
    total_bytes: int = 0
    error: str = ""


class ModelStates:
    """The node's per-model states; listeners hear of each change."""

    def __init__(self) -> None:
        self._states: dict[str, ModelState] = {}
        self._listeners: list[Callable[[ModelState], None]] = []

    def subscribe(self, listener: Callable[[ModelState], None]) -> None:
        self._listeners.append(listener)

    def get(self, model_id: str) -> ModelState:
        return self._states.get(model_id, ModelState(model_id))

    def set(self, model_id: str, state: str, *, downloaded: int = 0, total: int = 0, error: str = "") -> None:
        new = ModelState(model_id, state, downloaded, total, error)
        if self._states.get(model_id) == new:
            return
        self._states[model_id] = new
        self._notify(new)

    def progress(self, model_id: str, downloaded: int, total: int) -> None:
        old = self.get(model_id)
        self.set(model_id, DOWNLOADING, downloaded=downloaded, total=total or old.total_bytes)

    def remove(self, model_id: str) -> None:
        """Forgets a deleted model; listeners hear it is absent once, then it leaves the picture."""
        old = self._states.pop(model_id, None)
        if old is not None:
            self._notify(replace(old, state=ABSENT, downloaded_bytes=0, error=""))

    def snapshot(self) -> list[ModelState]:
        return [self._states[k] for k in sorted(self._states)]

    def _notify(self, state: ModelState) -> None:
        for listener in self._listeners:
            listener(state)
