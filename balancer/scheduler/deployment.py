"""A deployment: the operator's statement of *what* should run; the scheduler decides *where*.

A deployment asks for a fixed number of copies of one model, or for between ``min_copies`` and
``max_copies`` copies scaled on demand (``min_copies`` 0: scaled to zero when idle). A copy is one
model loaded on one node; a node holds a model once, so copies of one model are on distinct nodes.
("Copies", not "replicas": replicas are the balancer's own processes sharing one database.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

MAX_COPIES = 1024  # far above any fleet this balancer runs; refuses a typo like 10000


@dataclass(frozen=True, slots=True)
class Deployment:
    """How many copies of ``model_id`` should run, and on which nodes they may.

    Exactly one of ``copies`` (a fixed count) or ``max_copies`` (autoscaled between ``min_copies``
    and it) is set. ``selector``: every ``key=value`` must be among a node's labels. ``memory_mb``
    overrides the model's memory need (the catalogue's ``required_vram_mb`` or the estimate).
    """

    model_id: str
    copies: int | None = 1
    min_copies: int = 0
    max_copies: int | None = None
    selector: Mapping[str, str] = field(default_factory=dict)
    memory_mb: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def __post_init__(self) -> None:
        # A read-only copy: a frozen deployment must not change under the scheduler through its dict.
        object.__setattr__(self, "selector", MappingProxyType(dict(self.selector)))
        problem = self.problem()
        if problem:
            raise ValueError(f"deployment of {self.model_id!r}: {problem}")

    def problem(self) -> str:
        """What is wrong with this deployment, or "" when nothing is."""
        if not self.model_id:
            return "model_id is empty"
        if (self.copies is None) == (self.max_copies is None):
            return "give either copies or max_copies (with min_copies), not both or neither"
        if self.copies is not None and not 0 <= self.copies <= MAX_COPIES:
            return f"copies must be 0..{MAX_COPIES}"
        if self.max_copies is not None:
            if not 0 <= self.min_copies <= self.max_copies:
                return "min_copies must be 0..max_copies"
            if not 1 <= self.max_copies <= MAX_COPIES:
                return f"max_copies must be 1..{MAX_COPIES}"
        if self.memory_mb is not None and self.memory_mb <= 0:
            return "memory_mb must be positive"
        for key, value in self.selector.items():
            if not key or not value or "=" in key:
                return f"selector entry {key!r}={value!r} is not a label key=value"
        return ""

    @property
    def autoscaled(self) -> bool:
        return self.max_copies is not None

    @property
    def floor(self) -> int:
        """The fewest copies it may run: the fixed count, or ``min_copies``."""
        return self.copies if self.copies is not None else self.min_copies

    @property
    def ceiling(self) -> int:
        """The most copies it may run: the fixed count, or ``max_copies``."""
        return self.copies if self.copies is not None else (self.max_copies or 0)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when every selector label is among ``labels`` with the same value."""
        return all(labels.get(key) == value for key, value in self.selector.items())
