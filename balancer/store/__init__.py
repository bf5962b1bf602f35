"""The balancer's metadata store: catalogue, manifests, nodes, durable node commands, API keys."""

from balancer.store.store import Store
from balancer.store.tables import TooLong

__all__ = ["Store", "TooLong"]
