"""The balancer's metadata store: catalogue, manifests, nodes, durable node commands, API keys."""

from balancer.store.store import Store
from balancer.store.tables import TooLong
from balancer.store.unavailable import StoreUnavailable

__all__ = ["Store", "StoreUnavailable", "TooLong"]
