"""protobuf <-> internal types, in one place: servicers and clients call these and nothing else."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from common.errors import unknown_capabilities
from common.pb.llmlb.v1 import types_pb2 as pb
from common.types import (
    ApiKey,
    Backend,
    Capability,
    FileFormat,
    GpuDevice,
    KeyLimits,
    ManifestFile,
    Model,
    ModelOnNode,
    ModelSource,
    ModelState,
    Node,
    NodeState,
    Scope,
)

_FORMAT_TO_PB = {
    FileFormat.GGUF: pb.FILE_FORMAT_GGUF,
    FileFormat.SAFETENSORS: pb.FILE_FORMAT_SAFETENSORS,
    FileFormat.METAL: pb.FILE_FORMAT_METAL,
    FileFormat.ONNX: pb.FILE_FORMAT_ONNX,
    FileFormat.WHISPER: pb.FILE_FORMAT_WHISPER,
    FileFormat.CONFIG: pb.FILE_FORMAT_CONFIG,
    FileFormat.OTHER: pb.FILE_FORMAT_OTHER,
}
_FORMAT_FROM_PB: dict[int, FileFormat] = {int(v): k for k, v in _FORMAT_TO_PB.items()}

_BACKEND_TO_PB = {
    Backend.CUDA: pb.BACKEND_CUDA,
    Backend.METAL: pb.BACKEND_METAL,
    Backend.CPU: pb.BACKEND_CPU,
    Backend.ANY: pb.BACKEND_ANY,
}
_BACKEND_FROM_PB: dict[int, Backend] = {int(v): k for k, v in _BACKEND_TO_PB.items()}

_CAPABILITY_TO_PB = {
    Capability.CHAT: pb.CAPABILITY_CHAT,
    Capability.COMPLETION: pb.CAPABILITY_COMPLETION,
    Capability.EMBEDDING: pb.CAPABILITY_EMBEDDING,
    Capability.TRANSCRIPTION: pb.CAPABILITY_TRANSCRIPTION,
    Capability.SPEECH: pb.CAPABILITY_SPEECH,
    Capability.IMAGE: pb.CAPABILITY_IMAGE,
}
_CAPABILITY_FROM_PB: dict[int, Capability] = {int(v): k for k, v in _CAPABILITY_TO_PB.items()}

_MODEL_STATE_TO_PB = {
    ModelState.ABSENT: pb.MODEL_STATE_ABSENT,
    ModelState.DOWNLOADING: pb.MODEL_STATE_DOWNLOADING,
    ModelState.PRESENT: pb.MODEL_STATE_PRESENT,
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}
_MODEL_STATE_FROM_PB: dict[int, ModelState] = {int(v): k for k, v in _MODEL_STATE_TO_PB.items()}


def model_state_to_pb(state: ModelState) -> pb.ModelState.ValueType:
    return _MODEL_STATE_TO_PB[state]


def model_on_node_to_pb(s: ModelOnNode, *, ready: bool | None = None) -> pb.ModelNodeStatus:
    """One model's state on one node: what a node reports and what the balancer shows of it.

    ``ready`` defaults to the state alone (what a node says of itself); the balancer passes
    whether the node can serve the model now, which also needs the node in rotation.
    """
    return pb.ModelNodeStatus(
        node_id=s.node_id,
        model_id=s.model_id,
        state=model_state_to_pb(s.state),
        ready=s.ready if ready is None else ready,
        downloaded_bytes=s.downloaded_bytes,
        total_bytes=s.total_bytes,
        error=s.error,
        memory_mb=s.memory_mb,
        pinned=s.pinned,
        slots=s.slots,
    )


def model_on_node_from_pb(msg: pb.ModelNodeStatus) -> ModelOnNode:
    """A node's report of one model, with ``node_id`` left empty: the balancer takes a node's id from
    its session, never from what it says; ids are folded to lower case as everywhere."""
    return ModelOnNode(
        node_id="",
        model_id=msg.model_id.lower(),
        state=model_state_from_pb(msg.state),
        downloaded_bytes=msg.downloaded_bytes,
        total_bytes=msg.total_bytes,
        error=msg.error,
        memory_mb=msg.memory_mb,
        pinned=msg.pinned,
        slots=max(0, msg.slots),
    )


def model_state_from_pb(value: int) -> ModelState:
    """UNSPECIFIED (and anything unknown) reads as absent."""
    return _MODEL_STATE_FROM_PB.get(value, ModelState.ABSENT)


_NODE_STATE_TO_PB = {
    NodeState.ONLINE: pb.NODE_STATE_ONLINE,
    NodeState.OFFLINE: pb.NODE_STATE_OFFLINE,
    NodeState.DRAINING: pb.NODE_STATE_DRAINING,
}
_NODE_STATE_FROM_PB: dict[int, NodeState] = {int(v): k for k, v in _NODE_STATE_TO_PB.items()}


def node_state_to_pb(state: NodeState) -> pb.NodeState.ValueType:
    return _NODE_STATE_TO_PB[state]


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def from_timestamp(ts: Timestamp, present: bool) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if present else None


def backend_to_pb(backend: Backend) -> pb.Backend.ValueType:
    return _BACKEND_TO_PB[backend]


def backend_from_pb(value: int) -> Backend | None:
    return _BACKEND_FROM_PB.get(value)


def capabilities_to_pb(caps: Iterable[Capability]) -> list[pb.Capability.ValueType]:
    return [_CAPABILITY_TO_PB[c] for c in caps]


def formats_to_pb(formats: Iterable[FileFormat]) -> list[pb.FileFormat.ValueType]:
    return [_FORMAT_TO_PB[f] for f in formats]


def formats_from_pb(values: Iterable[int]) -> list[FileFormat]:
    """File formats as a peer reports them; values this build does not know are left out."""
    return [_FORMAT_FROM_PB[v] for v in values if v in _FORMAT_FROM_PB]


def capabilities_from_pb(values: Iterable[int]) -> list[Capability]:
    """Capabilities as a peer reports them; values this build does not know are left out."""
    return [_CAPABILITY_FROM_PB[v] for v in values if v in _CAPABILITY_FROM_PB]


def requested_capabilities_from_pb(values: Iterable[int]) -> list[Capability]:
    """Capabilities a caller asks for; UNSPECIFIED or a value this build does not know is refused."""
    values = list(values)
    unknown = [_enum_name(pb.Capability, v) for v in values if v not in _CAPABILITY_FROM_PB]
    if unknown:
        raise unknown_capabilities(unknown)
    return [_CAPABILITY_FROM_PB[v] for v in values]


def _enum_name(enum: Any, value: int) -> str:
    """``CAPABILITY_UNSPECIFIED`` for 0; the bare number for one the wire contract does not name."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def manifest_file_to_pb(f: ManifestFile) -> pb.ManifestFile:
    return pb.ManifestFile(
        filename=f.filename,
        format=_FORMAT_TO_PB[f.format],
        size_bytes=f.size_bytes,
        sha256=f.sha256,
        backends=[_BACKEND_TO_PB[b] for b in f.backends],
    )


def manifest_file_from_pb(msg: pb.ManifestFile) -> ManifestFile:
    return ManifestFile(
        filename=msg.filename,
        format=_FORMAT_FROM_PB.get(msg.format, FileFormat.OTHER),
        size_bytes=msg.size_bytes,
        sha256=msg.sha256,
        backends=tuple(_BACKEND_FROM_PB[b] for b in msg.backends if b in _BACKEND_FROM_PB) or (Backend.ANY,),
    )


def manifest_to_pb(model: Model, backend: Backend | None = None) -> pb.ModelManifest:
    """The manifest of ``model``; with ``backend``, only the files that backend needs."""
    files = [f for f in model.files if backend is None or f.needed_by(backend)]
    return pb.ModelManifest(
        model_id=model.id,
        repo=model.repo_id,
        revision=model.revision,
        origin=model.origin,
        files=[manifest_file_to_pb(f) for f in files],
        created_at=timestamp(model.created_at),
    )


def model_to_pb(model: Model) -> pb.Model:
    return pb.Model(
        id=model.id,
        name=model.name,
        source=model.source.value,
        repo_id=model.repo_id,
        capabilities=capabilities_to_pb(model.capabilities),
        tags=model.tags,
        required_vram_mb=model.required_vram_mb,
        chat_template=model.chat_template,
        manifest=manifest_to_pb(model),
        from_catalog=model.from_catalog,
        created_at=timestamp(model.created_at),
        updated_at=timestamp(model.updated_at),
    )


def model_from_pb(msg: pb.Model) -> Model:
    return Model(
        id=msg.id,
        name=msg.name,
        source=ModelSource(msg.source) if msg.source in ModelSource.__members__.values() else ModelSource.HF,
        repo_id=msg.repo_id,
        revision=msg.manifest.revision,
        origin=msg.manifest.origin,
        files=[manifest_file_from_pb(f) for f in msg.manifest.files],
        capabilities=capabilities_from_pb(msg.capabilities),
        tags=list(msg.tags),
        required_vram_mb=msg.required_vram_mb,
        chat_template=msg.chat_template,
        from_catalog=msg.from_catalog,
        created_at=from_timestamp(msg.created_at, msg.HasField("created_at")),
        updated_at=from_timestamp(msg.updated_at, msg.HasField("updated_at")),
    )


def gpu_to_pb(gpu: GpuDevice) -> pb.GpuDevice:
    return pb.GpuDevice(
        index=gpu.index, name=gpu.name, memory_total_mb=gpu.memory_total_mb, memory_free_mb=gpu.memory_free_mb
    )


def gpu_from_pb(msg: pb.GpuDevice) -> GpuDevice:
    return GpuDevice(
        index=msg.index, name=msg.name, memory_total_mb=msg.memory_total_mb, memory_free_mb=msg.memory_free_mb
    )


def node_to_pb(node: Node) -> pb.Node:
    return pb.Node(
        id=node.id,
        address=node.address,
        backends=[_BACKEND_TO_PB[b] for b in node.backends],
        gpus=[gpu_to_pb(g) for g in node.gpus],
        runtimes=node.runtimes,
        version=node.version,
        state=_NODE_STATE_TO_PB[node.state],
        registered_at=timestamp(node.registered_at),
        last_seen_at=timestamp(node.last_seen_at),
    )


_SCOPE_TO_PB = {
    Scope.API: pb.SCOPE_API,
    Scope.NODE: pb.SCOPE_NODE,
    Scope.ADMIN: pb.SCOPE_ADMIN,
}
_SCOPE_FROM_PB: dict[int, Scope] = {int(v): k for k, v in _SCOPE_TO_PB.items()}


def scope_to_pb(scope: Scope) -> pb.Scope.ValueType:
    return _SCOPE_TO_PB[scope]


def scope_from_pb(value: int) -> Scope | None:
    """None for UNSPECIFIED and values this build does not know."""
    return _SCOPE_FROM_PB.get(value)


def api_key_to_pb(key: ApiKey) -> pb.ApiKey:
    """A key as callers may see it: never the secret, nor its hash."""
    return pb.ApiKey(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        scopes=[_SCOPE_TO_PB[s] for s in key.scopes],
        created_at=timestamp(key.created_at),
        revoked_at=timestamp(key.revoked_at),
        last_used_at=timestamp(key.last_used_at),
        node_id=key.node_id,
        limits=key_limits_to_pb(key.limits),
    )


def key_limits_to_pb(limits: KeyLimits) -> pb.KeyLimits:
    return pb.KeyLimits(
        rpm=limits.rpm,
        tpm=limits.tpm,
        max_parallel=limits.max_parallel,
        daily_tokens=limits.daily_tokens,
        monthly_tokens=limits.monthly_tokens,
        models=list(limits.models),
    )


def key_limits_from_pb(limits: pb.KeyLimits) -> KeyLimits:
    return KeyLimits(
        rpm=limits.rpm,
        tpm=limits.tpm,
        max_parallel=limits.max_parallel,
        daily_tokens=limits.daily_tokens,
        monthly_tokens=limits.monthly_tokens,
        models=tuple(limits.models),
    )
