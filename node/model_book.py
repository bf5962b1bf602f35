"""Where each model stands on this node, as the balancer is told: absent, downloading, present, ...

The resolver and the downloader write here; the balancer link reads the whole picture for each
heartbeat and is told of every change, so progress reaches the balancer between heartbeats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from common.types import ModelOnNode, ModelState


class ModelBook:
    """The node's book of per-model states (``ModelOnNode`` with ``node_id`` left empty); listeners hear
    of each change."""

    def __init__(self) -> None:
        self._states: dict[str, ModelOnNode] = {}
        self._listeners: list[Callable[[ModelOnNode], None]] = []

    def subscribe(self, listener: Callable[[ModelOnNode], None]) -> None:
        self._listeners.append(listener)

    def get(self, model_id: str) -> ModelOnNode:
        return self._states.get(model_id, ModelOnNode("", model_id))

    def set(
        self, model_id: str, state: ModelState, *, downloaded: int = 0, total: int = 0, error: str = ""
    ) -> None:
        new = ModelOnNode("", model_id, state, downloaded, total, error)
        if self._states.get(model_id) == new:
            return
        self._states[model_id] = new
        self._notify(new)

    def progress(self, model_id: str, downloaded: int, total: int) -> None:
        old = self.get(model_id)
        self.set(model_id, ModelState.DOWNLOADING, downloaded=downloaded, total=total or old.total_bytes)

    def remove(self, model_id: str) -> None:
        """Forgets a deleted model; listeners hear it is absent once, then it leaves the picture."""
        old = self._states.pop(model_id, None)
        if old is not None:
            self._notify(replace(old, state=ModelState.ABSENT, downloaded_bytes=0, error=""))

    def snapshot(self) -> list[ModelOnNode]:
        return [self._states[k] for k in sorted(self._states)]

    def _notify(self, state: ModelOnNode) -> None:
        for listener in self._listeners:
            listener(state)
