"""One reconcile pass's accounting: free memory per device, who holds which copy, copies per zone.

Built once per pass from the nodes' reports and the scheduled copies; each placement the pass makes
is booked here at once, so the next placement sees the memory it took and the copy it added.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from balancer.scheduler.facts import DeviceFacts, DeviceKind, ModelNeed, NodeFacts


@dataclass(frozen=True, slots=True)
class Supply:
    """Where else a model's files are: online nodes holding them, and the fastest one fetching them."""

    holders: int = 0
    fetch_mb_s: float = 0.0


class Ledger:
    """Free memory, copies and supply as of this moment of one pass (see the module's docstring)."""

    def __init__(self, nodes: Iterable[NodeFacts]) -> None:
        self._free: dict[tuple[str, DeviceKind, int], int] = {}  # (node, kind, index) -> MB
        self._largest: dict[str, int] = {}  # node -> the most free on one device it places on
        self._holds: set[tuple[str, str]] = set()  # (model_id, node_id) with an active copy
        self._in_zone: Counter[tuple[str, str]] = Counter()  # (model_id, zone) -> active copies
        self._on_node: Counter[str] = Counter()  # node_id -> active copies of any model
        holders: Counter[str] = Counter()
        fetch: dict[str, float] = {}
        for node in nodes:
            for device in node.devices:
                self._free[(node.id, device.kind, device.index)] = device.free_mb
            self._largest[node.id] = self._most_free(node)
            if not node.online:
                continue
            for model_id in node.on_disk | node.shared | node.loaded:
                holders[model_id] += 1
            for model_id, download in node.downloading.items():
                fetch[model_id] = max(fetch.get(model_id, 0.0), download.rate_mb_s)
        self._supply = {m: Supply(holders[m], fetch.get(m, 0.0)) for m in holders.keys() | fetch.keys()}

    def book(self, model_id: str, node: NodeFacts, device: int, need_mb: int) -> None:
        """Count an active copy on the device of ``node`` it places models on with index ``device``;
        its memory is taken from what is free there, unless the node already reports the model using
        that device (then its free figure counts it)."""
        self._holds.add((model_id, node.id))
        if node.zone:
            self._in_zone[(model_id, node.zone)] += 1
        self._on_node[node.id] += 1
        kind = node.placement_kind
        key = (node.id, kind, device)
        reported = next((d for d in node.devices if d.kind is kind and d.index == device), None)
        if key in self._free and reported is not None and model_id not in reported.used_mb:
            self._free[key] -= need_mb
            self._largest[node.id] = self._most_free(node)

    def _most_free(self, node: NodeFacts) -> int:
        kind = node.placement_kind
        return max((self._free[(node.id, kind, d.index)] for d in node.devices if d.kind is kind), default=-1)

    def largest_free(self, node_id: str) -> int:
        """The most MB free on any one device ``node_id`` places models on (-1: it has none)."""
        return self._largest.get(node_id, -1)

    def free_mb(self, node_id: str, device: DeviceFacts) -> int:
        """What is free on ``device`` of ``node_id`` now: its report less this pass's placements."""
        return self._free.get((node_id, device.kind, device.index), 0)

    def holds(self, model_id: str, node_id: str) -> bool:
        return (model_id, node_id) in self._holds

    def in_zone(self, model_id: str, zone: str) -> int:
        """Active copies of ``model_id`` on nodes labelled ``zone`` ("" counts none)."""
        return self._in_zone[(model_id, zone)] if zone else 0

    def on_node(self, node_id: str) -> int:
        """Active copies of any model on ``node_id``."""
        return self._on_node[node_id]

    def supply(self, need: ModelNeed) -> Supply:
        return self._supply.get(need.model_id, Supply())
