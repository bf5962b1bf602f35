"""The scheduler's facts from the balancer's live fleet: each node's devices, labels and models, and
the copies the nodes report they keep loaded for the scheduler (pinned).

What a node reports: at registration its labels, backends, runtimes and offered memory (its budget
where the operator caps it); in each heartbeat its memory in use (capped: what its loaded models take),
each GPU's offer, and per model its state, the memory it takes and whether it is pinned.
"""

from __future__ import annotations

from collections.abc import Iterable

from balancer.fleet.view import Fleet
from balancer.scheduler.facts import Copy, CopyState, DeviceFacts, DeviceKind, Download, NodeFacts
from common.types import Backend, ModelOnNode, ModelState

COPY_STATES = {
    ModelState.ABSENT: CopyState.PLACING,
    ModelState.DOWNLOADING: CopyState.DOWNLOADING,
    ModelState.PRESENT: CopyState.LOADING,  # pinned and on disk: its load comes next
    ModelState.LOADING: CopyState.LOADING,
    ModelState.READY: CopyState.READY,
    ModelState.FAILED: CopyState.FAILED,
}


def node_ids(fleet: Fleet) -> list[str]:
    """Every node the fleet knows of: connected (here or on another replica) or registered."""
    return sorted(set(fleet.online()) | set(fleet.draining()) | set(fleet.registered_ids()))


def node_facts(fleet: Fleet, node_id: str) -> NodeFacts | None:
    """What the scheduler knows of ``node_id``; None when it never registered with this replica."""
    info = fleet.info(node_id)
    if info is None:
        return None
    models = fleet.node_models(node_id)
    load = fleet.load(node_id)
    backend = info.backends[0] if info.backends else Backend.CPU
    formats = info.runs
    used = {m.model_id: m.memory_mb for m in models if m.memory_mb > 0}
    total = (load.memory_total_mb if load is not None else 0) or info.memory_total_mb
    free = total - load.memory_used_mb if load is not None else total
    devices = [DeviceFacts(DeviceKind.CPU, 0, total, max(0, free), used)]
    gpus = load.gpus if load is not None and load.gpus else info.gpus
    for gpu in gpus:
        # Per GPU the node reports no split of what its models take: each counts them as its own,
        # so a placement's memory is never taken twice from a device already reporting the model.
        free_mb = gpu.memory_free_mb or gpu.memory_total_mb
        devices.append(DeviceFacts(DeviceKind.GPU, gpu.index, gpu.memory_total_mb, free_mb, used))
    return NodeFacts(
        id=node_id,
        backend=backend,
        formats=formats,
        devices=tuple(devices),
        online=fleet.is_online(node_id),
        draining=fleet.is_draining(node_id),
        labels=dict(info.labels),
        on_disk=frozenset(m.model_id for m in models if m.state.on_disk),
        loaded=frozenset(m.model_id for m in models if m.state is ModelState.READY),
        downloading={
            m.model_id: Download(m.downloaded_bytes, m.total_bytes)
            for m in models
            if m.state is ModelState.DOWNLOADING
        },
        load=(load.active_requests + load.queued_requests) if load is not None else 0,
    )


def fleet_facts(fleet: Fleet) -> list[NodeFacts]:
    """Every known node's facts, by id."""
    return [f for f in (node_facts(fleet, n) for n in node_ids(fleet)) if f is not None]


def pinned_copies(fleet: Fleet, nodes: Iterable[NodeFacts], since: float) -> dict[tuple[str, str], Copy]:
    """The copies nodes report they keep for the scheduler, by (model id, node id); ``since`` stamps
    a state first seen now."""
    out: dict[tuple[str, str], Copy] = {}
    for node in nodes:
        for status in fleet.node_models(node.id):
            if status.pinned:
                out[(status.model_id, node.id)] = copy_of(status, node, since)
    return out


def copy_of(status: ModelOnNode, node: NodeFacts, since: float) -> Copy:
    device = (
        0
        if node.placement_kind is DeviceKind.CPU
        else min((d.index for d in node.devices if d.kind is DeviceKind.GPU), default=0)
    )
    return Copy(status.model_id, status.node_id, device, COPY_STATES[status.state], since, slots=status.slots)
