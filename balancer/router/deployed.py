"""The models with a deployment, as the scheduler last read them: the router sends their requests to
the deployment's copies only, and a request that finds none ready wakes the scheduler to place one.

Routing a deployed model only to its copies (the nodes that keep it pinned) keeps the scheduler's count
true: a request never loads a copy of its own on some node, which then no scale-down would unload. A
request that finds no copy waits in the queue (bounded by the queue timeout and its deadline) until the
copy placed for it is ready; the scheduler's estimate of that copy's time to ready is its expected wait.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping


class Deployed:
    """What the scheduler tells the router (see the module's docstring); empty until its first pass."""

    def __init__(self) -> None:
        self._models: frozenset[str] = frozenset()
        self._eta: Mapping[str, float] = {}
        self._wake: Callable[[], None] | None = None
        self.version = 0  # changes with the set of models, so rankings cached before are redone

    def update(
        self, models: Collection[str], eta: Mapping[str, float], wake: Callable[[], None] | None
    ) -> None:
        """The models deployed now; ``eta``: by model, the scheduler's clock time its next copy is
        expected ready; ``wake`` runs the scheduler's next pass now."""
        models = frozenset(models)
        if models != self._models:
            self._models = models
            self.version += 1
        self._eta = dict(eta)
        self._wake = wake

    def add(self, model_id: str) -> None:
        """A deployment set on this replica: its requests go to its copies at once, not after the
        scheduler's next pass (a request meanwhile would load a copy of its own)."""
        self.update(self._models | {model_id}, self._eta, self._wake)

    def discard(self, model_id: str) -> None:
        """A deployment ended on this replica: its model is routed on demand again."""
        self.update(self._models - {model_id}, self._eta, self._wake)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def cold(self, model_id: str) -> None:
        """A request for deployed ``model_id`` found no ready copy: the scheduler places one now."""
        if model_id in self._models and self._wake is not None:
            self._wake()

    def ready_in(self, model_id: str, now: float) -> float | None:
        """Seconds until the copy being placed for ``model_id`` is expected ready; None when unknown."""
        at = self._eta.get(model_id)
        return None if at is None else max(0.0, at - now)
