"""JSON forms of models, manifests, statuses and nodes for ``/v1/models`` and the ``/v0`` management API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from balancer.control import DeletedModel, ModelView, NodeView
from balancer.fleet.view import ModelStatusView
from common.types import Model, ModelOnNode, ModelSource


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _owner(model: Model) -> str:
    """``local`` for a model placed by hand on nodes; else the repository's owner, or ``llmlb``."""
    if model.source is ModelSource.LOCAL:
        return "local"
    return model.repo_id.split("/", 1)[0] if "/" in model.repo_id else "llmlb"


def openai_model_json(view: ModelView) -> dict[str, Any]:
    """An OpenAI ``model`` object plus ``ready`` and ``nodes: [{node_id, ready}]``."""
    model = view.model
    return {
        "id": model.id,
        "object": "model",
        "created": int(model.created_at.timestamp()) if model.created_at else 0,
        "owned_by": _owner(model),
        "ready": view.ready,
        "nodes": [{"node_id": n.node_id, "ready": n.ready} for n in view.nodes],
    }


def openai_model_list_json(views: list[ModelView]) -> dict[str, Any]:
    return {"object": "list", "data": [openai_model_json(v) for v in views]}


def deleted_json(deleted: DeletedModel) -> dict[str, Any]:
    return {"id": deleted.model_id, "object": "model", "deleted": True}


def files_json(model: Model) -> list[dict[str, Any]]:
    return [
        {
            "filename": f.filename,
            "format": f.format.value,
            "size_bytes": f.size_bytes,
            "sha256": f.sha256,
            "backends": [b.value for b in f.backends],
        }
        for f in model.files
    ]


def manifest_json(model: Model) -> dict[str, Any]:
    """``model_id, repo, revision, files: [{filename, format, size_bytes, sha256, backends}], created_at``."""
    return {
        "model_id": model.id,
        "repo": model.repo_id,
        "revision": model.revision,
        "files": files_json(model),
        "created_at": _iso(model.created_at),
    }


def model_detail_json(view: ModelView) -> dict[str, Any]:
    """Everything the catalogue holds on a model, with its readiness per node."""
    model = view.model
    return {
        "id": model.id,
        "object": "model",
        "name": model.name,
        "source": model.source.value,
        "repo_id": model.repo_id,
        "revision": model.revision,
        "origin": model.origin,
        "capabilities": [c.value for c in model.capabilities],
        "tags": list(model.tags),
        "required_vram_mb": model.required_vram_mb,
        "total_bytes": model.total_bytes,
        "from_catalog": model.from_catalog,
        "files": files_json(model),
        "created_at": _iso(model.created_at),
        "updated_at": _iso(model.updated_at),
        "ready": view.ready,
        "nodes": [{"node_id": n.node_id, "ready": n.ready, "state": n.state.value} for n in view.nodes],
    }


def _model_on_node_json(state: ModelOnNode) -> dict[str, Any]:
    return {
        "node_id": state.node_id,
        "model_id": state.model_id,
        "state": state.state.value,
        "downloaded_bytes": state.downloaded_bytes,
        "total_bytes": state.total_bytes,
        "error": state.error,
        "pinned": state.pinned,  # a copy the scheduler placed: the node keeps it loaded
        "slots": state.slots,  # sequences the node runs at once for it, loaded; 0: not reported
    }


def status_json(view: ModelStatusView) -> dict[str, Any]:
    """``model_id, status, progress, downloaded_bytes, total_bytes, nodes: [...]``."""
    return {
        "model_id": view.model_id,
        "status": view.status.value,
        "progress": view.progress,
        "downloaded_bytes": view.downloaded_bytes,
        "total_bytes": view.total_bytes,
        "nodes": [_model_on_node_json(n) for n in view.nodes],
    }


def node_json(view: NodeView) -> dict[str, Any]:
    node, load = view.node, view.load
    return {
        "id": node.id,
        "address": node.address,
        "state": view.state.value,
        "backends": [b.value for b in node.backends],
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "memory_total_mb": g.memory_total_mb,
                "memory_free_mb": g.memory_free_mb,
            }
            for g in node.gpus
        ],
        "runtimes": list(node.runtimes),
        "version": node.version,
        "registered_at": _iso(node.registered_at),
        "last_seen_at": _iso(node.last_seen_at),
        "replica": view.replica,
        "load": None
        if load is None
        else {
            "active_requests": load.active_requests,
            "queued_requests": load.queued_requests,
            "cpu_percent": load.cpu_percent,
            "memory_used_mb": load.memory_used_mb,
            "memory_total_mb": load.memory_total_mb,
        },
        "models": [_model_on_node_json(m) for m in view.models],
    }
