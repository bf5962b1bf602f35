"""Which names may become metric labels and history series: models the catalogue holds, and nodes
registered with this balancer. Nothing else a caller or a node says ever does.

A request for a made-up model, a node reporting made-up model ids in its heartbeats, or an answer
carrying a node id that was never registered is counted under the one fixed label ``OTHER``, so none
of them can grow ``/metrics`` or the console's history. A model deleted or a node removed stops being
a label at once, and the history drops its series.
"""

from __future__ import annotations

from typing import Protocol

OTHER = ""  # the label every name outside the catalogue and the registered nodes is counted under
MODEL = "model"
NODE = "node"


class ModelNames(Protocol):
    def knows(self, model_id: str) -> bool: ...


class NodeNames(Protocol):
    def info(self, node_id: str) -> object | None: ...


class Labels:
    """Turns names into labels: a known name stays itself, anything else becomes ``OTHER``."""

    def __init__(self, models: ModelNames, nodes: NodeNames) -> None:
        self._models = models
        self._nodes = nodes

    def model(self, name: str) -> str:
        return name if name and self._models.knows(name) else OTHER

    def node(self, name: str) -> str:
        return name if name and self._nodes.info(name) is not None else OTHER

    def known(self, kind: str, name: str) -> bool:
        """Whether ``name`` is a model (``kind`` "model") or node ("node") that may have a series."""
        if kind == MODEL:
            return self.model(name) != OTHER
        if kind == NODE:
            return self.node(name) != OTHER
        return False
