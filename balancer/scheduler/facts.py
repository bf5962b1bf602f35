"""What the scheduler knows of the fleet: nodes and their devices, models' needs, copies and demand.

Plain frozen dataclasses built from what nodes report (a later step fills them from the live fleet);
the filters, scorers and the reconciler read only these, so each rule is testable without sockets.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.formats import WEIGHT_FORMATS
from common.types import Backend, FileFormat, Model

MIB = 1024 * 1024
# The memory a model's weights take once loaded, as a multiple of their file size (llama.cpp maps the
# file and adds compute buffers), when the catalogue gives no required_vram_mb.
WEIGHTS_OVERHEAD = 1.1
# The memory a node's context settings (context length, slots, KV cache type) add per loaded model,
# when the node does not say (XLLM's default 4,096-token context on a small model).
DEFAULT_CONTEXT_MB = 512


class DeviceKind(enum.StrEnum):
    GPU = "gpu"
    CPU = "cpu"  # the host's RAM


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """One device a node offers: a GPU's memory, or the host's RAM (``index`` 0).

    ``total_mb`` and ``free_mb`` are what the node offers: where the operator caps the node
    (``XLLM_MEMORY_BUDGET_MB``) the node reports the cap, not the hardware. ``used_mb`` is what each
    model loaded there takes, by model id.
    """

    kind: DeviceKind
    index: int
    total_mb: int
    free_mb: int
    used_mb: Mapping[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How reasons name it: "GPU 1", "RAM"."""
        return f"GPU {self.index}" if self.kind is DeviceKind.GPU else "RAM"


@dataclass(frozen=True, slots=True)
class Download:
    """A model a node is fetching: how far along and how fast (MB/s, 0 when not yet measured)."""

    done_bytes: int
    total_bytes: int
    rate_mb_s: float = 0.0


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """The scheduler's view of one node (``balancer.control.NodeView`` is the operator's).

    ``backend`` is the one the node runs models with; ``formats`` the weight formats its runtimes
    load. Models a node offers memory for are placed on its GPUs when its backend is a GPU's (CUDA,
    Metal), else in its RAM. ``on_disk`` holds models whose files are all in its models dir,
    ``shared`` those in the shared dir it reads in place, ``loaded`` those in memory now.
    ``load`` is its requests in flight and queued. ``context_mb``: see ``DEFAULT_CONTEXT_MB``.
    """

    id: str
    backend: Backend
    formats: frozenset[FileFormat]
    devices: tuple[DeviceFacts, ...]
    online: bool = True
    draining: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    on_disk: frozenset[str] = frozenset()
    shared: frozenset[str] = frozenset()
    loaded: frozenset[str] = frozenset()
    downloading: Mapping[str, Download] = field(default_factory=dict)
    load: int = 0
    context_mb: int = DEFAULT_CONTEXT_MB
    # Derived once, as every filter and scorer of a pass reads them for every node.
    zone: str = field(init=False, default="")  # the ``zone`` label; "" when it has none
    placement_kind: DeviceKind = field(init=False, default=DeviceKind.GPU)  # the devices it places on

    def __post_init__(self) -> None:
        object.__setattr__(self, "zone", self.labels.get("zone", ""))
        kind = DeviceKind.CPU if self.backend is Backend.CPU else DeviceKind.GPU
        object.__setattr__(self, "placement_kind", kind)


@dataclass(frozen=True, slots=True)
class ModelNeed:
    """What placing one copy of a model takes: its weight format, the bytes to fetch, its memory.

    ``backends``: the backends it has files for (``ANY``: every one). ``required_mb``: the
    catalogue's ``required_vram_mb``; 0 when unknown, then estimated per node (``memory_mb``).
    """

    model_id: str
    format: FileFormat
    size_bytes: int
    required_mb: int = 0
    backends: frozenset[Backend] = frozenset({Backend.ANY})

    @classmethod
    def of(cls, model: Model) -> ModelNeed:
        """The need of a catalogue model, from its manifest."""
        present = {f.format for f in model.files}
        fmt = next((f for f in WEIGHT_FORMATS if f in present), FileFormat.OTHER)
        weights = [f for f in model.files if f.format in WEIGHT_FORMATS]
        backends = frozenset(b for f in weights for b in f.backends) or frozenset({Backend.ANY})
        # Metal-only files are fetched only by Metal nodes: a model with both counts the others.
        size = sum(f.size_bytes for f in model.files if f.needed_by(Backend.CPU)) or model.total_bytes
        return cls(model.id, fmt, size, model.required_vram_mb, backends)

    def runs_on(self, backend: Backend) -> bool:
        return Backend.ANY in self.backends or backend in self.backends

    def memory_mb(self, node: NodeFacts, override_mb: int | None = None) -> int:
        """MB one copy takes on ``node``: the deployment's override, the catalogue's figure, or the
        file size times ``WEIGHTS_OVERHEAD`` plus the node's context memory."""
        if override_mb:
            return override_mb
        if self.required_mb > 0:
            return self.required_mb
        return math.ceil(self.size_bytes / MIB * WEIGHTS_OVERHEAD) + node.context_mb


class CopyState(enum.StrEnum):
    PLACING = "placing"  # placed, the node not yet told or not yet answering
    DOWNLOADING = "downloading"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"

    @property
    def active(self) -> bool:
        """Counts toward a deployment's copies: on its way to serving, or serving."""
        return self not in (CopyState.FAILED, CopyState.UNLOADING)


@dataclass(frozen=True, slots=True)
class Copy:
    """One scheduled copy: a model placed on a node's device, and how it is doing.

    ``since``: when it entered ``state`` (a failed copy's ``since`` tells one failure from the next);
    ``placed_at`` and ``estimate_s``: when it was placed and how long the scheduler expected it to
    take to answer, to compare with what happened.
    """

    model_id: str
    node_id: str
    device: int
    state: CopyState
    since: float = 0.0
    placed_at: float = 0.0
    estimate_s: float = 0.0
    slots: int = 0  # the calls its node runs at once for the model, as it reports them; 0: not reported


@dataclass(frozen=True, slots=True)
class Demand:
    """Requests for one model, as the router saw them over its last window.

    ``queue_wait_s``: the mean time requests waited for a slot; ``waiting``: requests waiting now;
    ``in_flight``: requests being answered now, over all copies; ``last_request_at``: on the
    scheduler's clock, None when none came since the balancer started.
    """

    model_id: str
    queue_wait_s: float = 0.0
    waiting: int = 0
    in_flight: int = 0
    last_request_at: float | None = None
