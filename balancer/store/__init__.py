"""The balancer's metadata store: catalogue, manifests, nodes, durable node commands, API keys."""

from balancer.store.store import Store

__all__ = ["Store"]
