"""The placement filters, one rule per module, in the order they are tried: the cheap rules that
depend only on the node first, the memory fit last."""

from __future__ import annotations

from balancer.scheduler.filters.backoff import FAILURE_BACKOFF_S, BackoffFilter
from balancer.scheduler.filters.capability import CapabilityFilter
from balancer.scheduler.filters.memory_fit import MemoryFitFilter
from balancer.scheduler.filters.one_per_node import OnePerNodeFilter
from balancer.scheduler.filters.online import OnlineFilter
from balancer.scheduler.filters.selector import SelectorFilter
from balancer.scheduler.rules import Filter


def default_filters(backoff_s: float = FAILURE_BACKOFF_S) -> tuple[Filter, ...]:
    return (
        OnlineFilter(),
        SelectorFilter(),
        CapabilityFilter(),
        OnePerNodeFilter(),
        BackoffFilter(backoff_s),
        MemoryFitFilter(),
    )


__all__ = [
    "FAILURE_BACKOFF_S",
    "BackoffFilter",
    "CapabilityFilter",
    "MemoryFitFilter",
    "OnePerNodeFilter",
    "OnlineFilter",
    "SelectorFilter",
    "default_filters",
]
