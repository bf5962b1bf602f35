"""The balancer's live view of the fleet: which nodes are connected and what each reports per model.

Durable facts (a node's registration, queued commands) live in the store; this is the in-memory
picture the node sessions keep up to date and the router reads.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from common.prefixes import MAX_REPORTED
from common.types import Backend, Capability, FileFormat, GpuDevice, Model, ModelOnNode, ModelState

# The weight formats each runtime a node may report loads (see node/runtimes/*: their RuntimeSpec), for
# nodes that register without their formats (older builds, rows read back from the store).
RUNTIME_FORMATS: dict[str, frozenset[FileFormat]] = {
    "llama.cpp": frozenset({FileFormat.GGUF}),
    "stable-diffusion.cpp": frozenset({FileFormat.GGUF, FileFormat.SAFETENSORS}),
    "onnxruntime": frozenset({FileFormat.ONNX}),
    "faster-whisper": frozenset({FileFormat.WHISPER}),
    "transformers": frozenset({FileFormat.SAFETENSORS}),
    "vllm": frozenset({FileFormat.SAFETENSORS}),
}


def formats_of_runtimes(runtimes: Iterable[str]) -> frozenset[FileFormat]:
    return frozenset(f for runtime in runtimes for f in RUNTIME_FORMATS.get(runtime, ()))


@dataclass(slots=True)
class ModelStatusView:
    model_id: str
    status: ModelState
    progress: float
    downloaded_bytes: int
    total_bytes: int
    nodes: list[ModelOnNode] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """How busy a node said it was in its last heartbeat."""

    active_requests: int = 0
    queued_requests: int = 0
    cpu_percent: float = 0.0
    memory_used_mb: int = 0
    memory_total_mb: int = 0  # what the node offers: its memory budget where the operator caps it
    gpus: tuple[GpuDevice, ...] = ()  # each GPU's offer, where the node is capped
    kv_cache_percent: float = 0.0  # the fullest key/value cache of a model server it runs (vLLM)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node said about itself when it registered: where to call it and what it can serve.

    ``auth_token`` is the node's own token (``XLLM_AUTH_TOKEN``), which calls to it present instead of
    the fleet token; it lives here only, in memory: never stored, listed or logged (``repr=False``
    keeps it out of any printed record).
    """

    node_id: str
    address: str
    capabilities: frozenset[Capability] = frozenset()
    auth_token: str = field(default="", repr=False)
    # What the scheduler places by: the node's labels, backends, runtimes and offered memory.
    labels: Mapping[str, str] = field(default_factory=dict)
    backends: tuple[Backend, ...] = ()
    runtimes: tuple[str, ...] = ()
    gpus: tuple[GpuDevice, ...] = ()
    memory_total_mb: int = 0
    # The weight formats its runtimes load; a node that reported none is read from its ``runtimes``.
    formats: frozenset[FileFormat] = frozenset()

    @property
    def runs(self) -> frozenset[FileFormat]:
        """The weight formats this node can run."""
        return self.formats or formats_of_runtimes(self.runtimes)


class Fleet:
    """Connected nodes, their per-model states and their last reported load.

    A node is connected to this replica (its session is here) or to another replica of the same
    database (``remote``: what it reports reaches us through the store, see ``balancer.fleet.rows``).
    Both are routed to alike; a local session always wins over a remote report.
    """

    def __init__(self, fleet_token: Callable[[], str] = lambda: "") -> None:
        # The fleet token to present now (``balancer.fleet.token.FleetTokens.current``): it rotates.
        self._fleet_token = fleet_token
        self._online: set[str] = set()
        self._remote: dict[str, str] = {}  # node_id -> the replica holding its session
        self._draining: set[str] = set()
        self._stopping: set[str] = set()  # draining because they are shutting down: no undrain
        self._info: dict[str, NodeInfo] = {}
        self._models: dict[str, dict[str, ModelOnNode]] = {}  # node_id -> model_id -> state
        self._load: dict[str, NodeLoad] = {}
        self._load_listeners: list[Callable[[str], None]] = []
        # node_id -> model_id -> the prompt prefix hashes the node last reported it keeps computed
        self._prefixes: dict[str, dict[str, frozenset[int]]] = {}
        # node_id -> bumped whenever what the node holds in memory may be gone (a new session, a
        # restart, a removal): the router's own guesses of what a node holds are tied to this
        self._epochs: dict[str, int] = {}
        self.version = 0  # bumped on every change the router's candidate lists depend on

    def registered(self, info: NodeInfo) -> None:
        """The node (re)registered: a restarted node has lost every prefix it had computed."""
        self._info[info.node_id] = info
        self._forget_prefixes(info.node_id)
        self.version += 1

    def info(self, node_id: str) -> NodeInfo | None:
        return self._info.get(node_id)

    def registered_ids(self) -> list[str]:
        """Every node registered in this process's life (or seen on another replica), connected or not."""
        return sorted(self._info)

    def token(self, node_id: str) -> str:
        """The token calls to ``node_id`` present now: its own, else the fleet's; empty when unknown."""
        credential = self.credential(node_id)
        return credential if isinstance(credential, str) else credential()

    def credential(self, node_id: str) -> str | Callable[[], str]:
        """What calls to ``node_id`` present: the node's own token from its latest registration, else
        what reads the current fleet token at each call (one channel outlives its rotations)."""
        info = self._info.get(node_id)
        if info is None:
            return ""
        return info.auth_token or self._fleet_token

    def set_draining(self, node_id: str, draining: bool) -> None:
        if draining != (node_id in self._draining):
            (self._draining.add if draining else self._draining.discard)(node_id)
            self.version += 1

    def is_draining(self, node_id: str) -> bool:
        return node_id in self._draining

    def set_stopping(self, node_id: str, stopping: bool) -> None:
        """Records whether the node said it is shutting down (its drain then cannot be undone)."""
        (self._stopping.add if stopping else self._stopping.discard)(node_id)

    def is_stopping(self, node_id: str) -> bool:
        return node_id in self._stopping

    def online(self) -> list[str]:
        """Connected nodes in rotation: online, registered in this process's life, not draining."""
        return sorted(n for n in self._online if n in self._info and n not in self._draining)

    def draining(self) -> list[str]:
        """Connected nodes finishing their work and taking none."""
        return sorted(n for n in self._online if n in self._draining)

    def remove(self, node_id: str) -> None:
        """Forgets a node entirely (``llmlb nodes rm``)."""
        self._online.discard(node_id)
        self._draining.discard(node_id)
        self._stopping.discard(node_id)
        self._remote.pop(node_id, None)
        self._info.pop(node_id, None)
        self._models.pop(node_id, None)
        self._load.pop(node_id, None)
        self._forget_prefixes(node_id)
        self.version += 1

    def set_load(self, node_id: str, load: NodeLoad) -> None:
        self._load[node_id] = load
        for listener in self._load_listeners:
            listener(node_id)

    def on_load(self, listener: Callable[[str], None]) -> None:
        """Calls ``listener(node_id)`` as each load report is recorded (the router's load estimate)."""
        self._load_listeners.append(listener)

    def load(self, node_id: str) -> NodeLoad | None:
        return self._load.get(node_id)

    def node_models(self, node_id: str) -> list[ModelOnNode]:
        return [self._models.get(node_id, {})[k] for k in sorted(self._models.get(node_id, {}))]

    def connected(self, node_id: str) -> None:
        self._online.add(node_id)
        self._remote.pop(node_id, None)
        self.version += 1

    def disconnected(self, node_id: str) -> None:
        self._online.discard(node_id)
        self._draining.discard(node_id)  # a drained node that comes back starts fresh
        self._stopping.discard(node_id)
        self._remote.pop(node_id, None)
        # A node re-sends its reports after each hello; until then it is not known to hold anything.
        self._forget_prefixes(node_id)
        self.version += 1

    # -- prompt prefixes (cache-aware routing) ------------------------------------------------------

    def set_prefixes(self, node_id: str, model_id: str, hashes: Iterable[int]) -> None:
        """The node's report of the prefixes ``model_id`` keeps computed; replaces the previous one.

        At most ``MAX_REPORTED`` hashes are kept (a node reports no more; a faulty one cannot make
        the balancer hold more). An empty report (the model unloaded) forgets the model.
        """
        kept = frozenset(itertools.islice(hashes, MAX_REPORTED))
        per_node = self._prefixes.setdefault(node_id, {})
        if kept:
            per_node[model_id] = kept
        else:
            per_node.pop(model_id, None)

    def prefixes(self, node_id: str, model_id: str) -> frozenset[int]:
        """The prefix hashes ``node_id`` last reported for ``model_id``; empty when none."""
        return self._prefixes.get(node_id, {}).get(model_id, frozenset())

    def node_prefixes(self, node_id: str) -> dict[str, frozenset[int]]:
        """Every model's reported prefix hashes on ``node_id``."""
        return dict(self._prefixes.get(node_id, {}))

    def epoch(self, node_id: str) -> int:
        """Changes whenever ``node_id`` may have lost what it had computed (see ``__init__``)."""
        return self._epochs.get(node_id, 0)

    def _forget_prefixes(self, node_id: str) -> None:
        self._prefixes.pop(node_id, None)
        self._epochs[node_id] = self._epochs.get(node_id, 0) + 1

    def attached_elsewhere(
        self,
        info: NodeInfo,
        replica_id: str,
        *,
        models: list[ModelOnNode],
        load: NodeLoad,
        draining: bool,
        prefixes: dict[str, frozenset[int]] | None = None,
        stopping: bool = False,
    ) -> None:
        """The node's session is on ``replica_id``: route to it with what it last reported there."""
        if self._info.get(info.node_id) != info:
            self.registered(info)
        if info.node_id not in self._online:
            self._online.add(info.node_id)
            self.version += 1
        self._remote[info.node_id] = replica_id
        self.replace(info.node_id, models)
        self.set_load(info.node_id, load)
        self.set_draining(info.node_id, draining)
        self.set_stopping(info.node_id, stopping)
        if prefixes is not None:  # the holder's reports replace ours, model by model
            for model_id in set(self._prefixes.get(info.node_id, {})) - set(prefixes):
                self.set_prefixes(info.node_id, model_id, ())
            for model_id, hashes in prefixes.items():
                self.set_prefixes(info.node_id, model_id, hashes)

    def remote_replica(self, node_id: str) -> str | None:
        """The replica holding the node's session when that is not this one; None otherwise."""
        return self._remote.get(node_id)

    def remote_nodes(self) -> dict[str, str]:
        """Nodes connected to other replicas, with the replica holding each."""
        return dict(self._remote)

    def is_online(self, node_id: str) -> bool:
        return node_id in self._online

    def report(self, status: ModelOnNode) -> None:
        per_node = self._models.setdefault(status.node_id, {})
        old = per_node.get(status.model_id)
        per_node[status.model_id] = status
        if old is None or (old.state, old.slots) != (status.state, status.slots):
            self.version += 1

    def replace(self, node_id: str, statuses: list[ModelOnNode]) -> None:
        """The node's full picture from a heartbeat: what it no longer reports is gone."""
        new = {s.model_id: s for s in statuses}
        old = self._models.get(node_id, {})
        if {k: (v.state, v.slots) for k, v in old.items()} != {k: (v.state, v.slots) for k, v in new.items()}:
            self.version += 1
        self._models[node_id] = new

    def forget_model(self, model_id: str) -> None:
        for per_node in self._models.values():
            per_node.pop(model_id, None)
        self.version += 1

    def state_on(self, node_id: str, model_id: str) -> ModelOnNode | None:
        return self._models.get(node_id, {}).get(model_id)

    def model_nodes(self, model_id: str) -> list[ModelOnNode]:
        return sorted(
            (m[model_id] for m in self._models.values() if model_id in m),
            key=lambda s: s.node_id,
        )

    def status(self, model: Model) -> ModelStatusView:
        """Fleet-wide state of ``model``: the furthest-along online node decides.

        Progress counts against that node's own total when it reports one: a node fetches only the
        files its backend needs (no ``.metal.bin`` on CPU), fewer bytes than the whole manifest.
        """
        nodes = self.model_nodes(model.id)
        online = [n for n in nodes if n.node_id in self._online]
        best = max(online, key=lambda n: (n.state.rank, n.downloaded_bytes), default=None)
        if best is None:
            return ModelStatusView(model.id, ModelState.ABSENT, 0.0, 0, model.total_bytes, nodes)
        total = best.total_bytes or model.total_bytes
        done = total if best.state.on_disk else best.downloaded_bytes
        progress = min(1.0, done / total) if total else (1.0 if best.state.on_disk else 0.0)
        return ModelStatusView(model.id, best.state, progress, done, total, nodes)
