"""The placement scorers, one rule per module; ``balancer.scheduler.ranking`` combines them."""

from __future__ import annotations

from balancer.scheduler.scorers.least_loaded import LeastLoadedScorer
from balancer.scheduler.scorers.ready_soonest import Estimate, ReadySoonestScorer
from balancer.scheduler.scorers.spread import SpreadScorer

__all__ = ["Estimate", "LeastLoadedScorer", "ReadySoonestScorer", "SpreadScorer"]
