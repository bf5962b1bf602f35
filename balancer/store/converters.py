"""The one place where store rows and the dataclasses of ``common.types`` are converted."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from balancer.store.tables import ApiKeyRow, ManifestFileRow, ModelRow, NodeCommandRow, NodeRow
from common.types import (
    ApiKey,
    Backend,
    Capability,
    CommandKind,
    FileFormat,
    GpuDevice,
    KeyLimits,
    ManifestFile,
    Model,
    ModelSource,
    Node,
    NodeCommand,
    NodeState,
    Scope,
)


def utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive datetime is refused rather than guessed."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value.isoformat()}: pass a timezone-aware time")
    return value.astimezone(UTC)


def optional_utc(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


# models


def fill_model_row(row: ModelRow, model: Model) -> None:
    """Copy a model's own fields (not its timestamps, which the store decides) into ``row``."""
    row.name = model.name
    row.source = model.source.value
    row.repo_id = model.repo_id
    row.revision = model.revision
    row.origin = model.origin
    row.capabilities = [c.value for c in model.capabilities]
    row.tags = list(model.tags)
    row.required_vram_mb = model.required_vram_mb
    row.chat_template = model.chat_template
    row.from_catalog = model.from_catalog


def file_rows(model_id: str, files: Sequence[ManifestFile]) -> list[ManifestFileRow]:
    return [
        ManifestFileRow(
            model_id=model_id,
            position=position,
            filename=f.filename,
            format=f.format.value,
            size_bytes=f.size_bytes,
            sha256=f.sha256,
            backends=[b.value for b in f.backends],
        )
        for position, f in enumerate(files)
    ]


def manifest_file(row: ManifestFileRow) -> ManifestFile:
    return ManifestFile(
        filename=row.filename,
        format=FileFormat(row.format),
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        backends=tuple(Backend(b) for b in row.backends),
    )


def model(row: ModelRow, files: Sequence[ManifestFileRow]) -> Model:
    """The model of ``row`` with ``files`` (already in manifest order)."""
    return Model(
        id=row.id,
        name=row.name,
        source=ModelSource(row.source),
        repo_id=row.repo_id,
        revision=row.revision,
        origin=row.origin,
        files=[manifest_file(f) for f in files],
        capabilities=[Capability(c) for c in row.capabilities],
        tags=list(row.tags),
        required_vram_mb=row.required_vram_mb,
        chat_template=row.chat_template,
        from_catalog=row.from_catalog,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


# nodes


def _gpu_json(gpu: GpuDevice) -> dict[str, Any]:
    return {
        "index": gpu.index,
        "name": gpu.name,
        "memory_total_mb": gpu.memory_total_mb,
        "memory_free_mb": gpu.memory_free_mb,
    }


def _gpu(data: dict[str, Any]) -> GpuDevice:
    return GpuDevice(
        index=int(data["index"]),
        name=str(data["name"]),
        memory_total_mb=int(data["memory_total_mb"]),
        memory_free_mb=int(data.get("memory_free_mb", 0)),
    )


def fill_node_row(row: NodeRow, node: Node) -> None:
    """Copy a node's own fields (not its timestamps, which the store decides) into ``row``."""
    row.address = node.address
    row.backends = [b.value for b in node.backends]
    row.gpus = [_gpu_json(g) for g in node.gpus]
    row.runtimes = list(node.runtimes)
    row.version = node.version
    row.state = node.state.value
    row.owner_key_id = node.owner_key_id or None


def node(row: NodeRow) -> Node:
    return Node(
        id=row.id,
        address=row.address,
        backends=[Backend(b) for b in row.backends],
        gpus=[_gpu(g) for g in row.gpus],
        runtimes=list(row.runtimes),
        version=row.version,
        state=NodeState(row.state),
        registered_at=row.registered_at,
        last_seen_at=row.last_seen_at,
        replica_id=row.replica_id or "",
        live=row.live or "",
        owner_key_id=row.owner_key_id or "",
    )


# node commands


def command(row: NodeCommandRow) -> NodeCommand:
    return NodeCommand(
        id=row.id,
        node_id=row.node_id,
        kind=CommandKind(row.kind),
        model_id=row.model_id,
        created_at=row.created_at,
    )


# api keys


def api_key_row(key: ApiKey, *, created_at: datetime) -> ApiKeyRow:
    return ApiKeyRow(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        secret_hash=key.secret_hash,
        scopes=[s.value for s in key.scopes],
        created_at=created_at,
        revoked_at=optional_utc(key.revoked_at),
        last_used_at=optional_utc(key.last_used_at),
        node_id=key.node_id or None,
        **limit_columns(key.limits),
    )


def limit_columns(limits: KeyLimits) -> dict[str, Any]:
    """The ``api_keys`` columns of ``limits``: NULL where there is no limit."""
    return {
        "limit_rpm": limits.rpm or None,
        "limit_tpm": limits.tpm or None,
        "limit_parallel": limits.max_parallel or None,
        "limit_daily_tokens": limits.daily_tokens or None,
        "limit_monthly_tokens": limits.monthly_tokens or None,
        "allowed_models": list(limits.models) or None,
    }


def api_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        secret_hash=row.secret_hash,
        scopes=tuple(Scope(s) for s in row.scopes),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
        node_id=row.node_id or "",
        limits=KeyLimits(
            rpm=row.limit_rpm or 0,
            tpm=row.limit_tpm or 0,
            max_parallel=row.limit_parallel or 0,
            daily_tokens=row.limit_daily_tokens or 0,
            monthly_tokens=row.limit_monthly_tokens or 0,
            models=tuple(row.allowed_models or ()),
        ),
    )
