"""Small fleets described as data: GPUs, hosts and models of known sizes, and a clock to move by hand."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from balancer.scheduler import DeviceFacts, DeviceKind, ModelNeed, NodeFacts
from common.types import Backend, FileFormat

GB = 1024  # MB
GIB = 1024**3
LLAMA_CPP = frozenset({FileFormat.GGUF})


def gpu(
    index: int, total_gb: float, free_gb: float | None = None, used: Mapping[str, int] | None = None
) -> DeviceFacts:
    total = int(total_gb * GB)
    free = total if free_gb is None else int(free_gb * GB)
    return DeviceFacts(DeviceKind.GPU, index, total, free, dict(used or {}))


def ram(total_gb: float, free_gb: float | None = None) -> DeviceFacts:
    total = int(total_gb * GB)
    return DeviceFacts(DeviceKind.CPU, 0, total, total if free_gb is None else int(free_gb * GB))


def cuda_node(node_id: str, *gpus: DeviceFacts, **changes: Any) -> NodeFacts:
    """A CUDA node running llama.cpp, with 64 GB of RAM besides its GPUs."""
    fields: dict[str, Any] = {"backend": Backend.CUDA, "formats": LLAMA_CPP, "devices": (*gpus, ram(64))}
    fields.update(changes)
    return NodeFacts(node_id, **fields)


def cpu_node(node_id: str, ram_gb: float, **changes: Any) -> NodeFacts:
    fields: dict[str, Any] = {"backend": Backend.CPU, "formats": LLAMA_CPP, "devices": (ram(ram_gb),)}
    fields.update(changes)
    return NodeFacts(node_id, **fields)


def gguf(model_id: str, size_gb: float, required_gb: float = 0) -> ModelNeed:
    return ModelNeed(model_id, FileFormat.GGUF, int(size_gb * GIB), int(required_gb * GB))


@dataclass
class Clock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now
