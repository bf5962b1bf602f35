"""Metrics of one HTTP inference request: outcome, latency to the last byte, time to the first chunk."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.inference import Usage
from common.metrics import BalancerMetrics

DOOR = "http"


@dataclass(slots=True)
class Call:
    """One request being answered; ``done`` records it once, whichever way it ends."""

    metrics: BalancerMetrics
    route: str
    model: str = ""  # set once the model is known to exist, so unknown names do not become labels
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False

    def first_chunk(self) -> None:
        self.metrics.first_token(self.route, time.perf_counter() - self.started)

    def tokens(self, usage: Usage) -> None:
        self.metrics.tokens(self.model, usage.prompt_tokens, usage.completion_tokens)

    def done(self, code: str) -> None:
        """``code`` is ``ok`` or an ``ErrorCode`` value."""
        if not self.finished:
            self.finished = True
            self.metrics.observe(DOOR, self.route, self.model, code, time.perf_counter() - self.started)
