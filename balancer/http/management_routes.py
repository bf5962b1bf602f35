"""The ``/v0`` management API: register, inspect and pull models, read manifests and statuses, list,
drain, undrain and remove nodes, and read this replica's short history of request metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from balancer import control
from balancer.catalog import RegisterRequest
from balancer.fleet import nodes
from balancer.http import openai_answers as out
from balancer.http import openai_requests as cv
from balancer.http.resources import manifest_json, model_detail_json, node_json, status_json
from balancer.http.route_table import Handlers
from balancer.http.schemas import PullModelBody, RegisterModelBody
from balancer.parts import BalancerParts
from common.errors import ErrorCode, LlmlbError, unknown_capabilities
from common.types import Capability


def _capabilities(names: list[str]) -> list[Capability]:
    try:
        return [Capability(name) for name in names]
    except ValueError:
        raise unknown_capabilities(names) from None


def register_request(body: RegisterModelBody) -> RegisterRequest:
    return RegisterRequest(
        repo_id=body.repo_id,
        filename=body.filename,
        revision=body.revision,
        model_id=body.model_id,
        origin=body.origin,
        name=body.name,
        capabilities=_capabilities(body.capabilities),
        tags=list(body.tags),
        required_vram_mb=body.required_vram_mb,
        chat_template=body.chat_template,
    )


def management_routes(parts: BalancerParts) -> Handlers:
    """``/v0``: reads need an ``api`` key, writes an ``admin`` key (see ``balancer.edge.access``)."""

    def answer(payload: object, status: int = 200) -> Response:
        return Response(out.dumps(payload), status_code=status, media_type="application/json")

    async def register_model(request: Request) -> Response:
        body = cv.parse_body(RegisterModelBody, await request.body())
        model = await parts.catalog.register(register_request(body))
        return answer(model_detail_json(control.model_view(parts.fleet, model)), 201)

    async def list_models(request: Request) -> Response:
        views = await control.list_models(parts)
        return answer({"object": "list", "data": [model_detail_json(v) for v in views]})

    async def manifest(request: Request) -> Response:
        return answer(manifest_json(await parts.catalog.get(request.path_params["model_id"])))

    async def status(request: Request) -> Response:
        return answer(status_json(await control.model_status(parts, request.path_params["model_id"])))

    async def list_nodes(request: Request) -> Response:
        views = await control.list_nodes(parts)
        return answer({"object": "list", "data": [node_json(v) for v in views]})

    async def pull_model(request: Request) -> Response:
        body = cv.parse_body(PullModelBody, await request.body() or b"{}")
        pulled = await nodes.pull_model(parts, request.path_params["model_id"], list(body.node_ids))
        return answer({"model_id": pulled.model_id, "node_ids": list(pulled.node_ids)}, 202)

    async def drain_node(request: Request) -> Response:
        node = await nodes.drain_node(parts, request.path_params["node_id"])
        return answer({"id": node.id, "state": node.state.value})

    async def undrain_node(request: Request) -> Response:
        node = await nodes.undrain_node(parts, request.path_params["node_id"])
        return answer({"id": node.id, "state": node.state.value})

    async def remove_node(request: Request) -> Response:
        return answer({"id": await nodes.remove_node(parts, request.path_params["node_id"]), "removed": True})

    async def history(request: Request) -> Response:
        query = request.query_params
        kind, name = "all", ""
        if query.get("model"):
            kind, name = "model", query["model"].lower()
        elif query.get("node"):
            kind, name = "node", query["node"]
        try:
            since = float(query.get("since", "0"))
        except ValueError:
            raise LlmlbError(
                ErrorCode.INVALID_REQUEST, "since must be a time in seconds since the epoch"
            ) from None
        h = parts.history
        return answer(
            {
                "replica": parts.replicas.id,
                "bucket_s": h.bucket_s,
                "series": {"kind": kind, "name": name, "points": h.points(kind, name, since)},
                "models": h.names("model"),
                "nodes": h.names("node"),
            }
        )

    return {
        "register_model": register_model,
        "model_details": list_models,
        "manifest": manifest,
        "model_status": status,
        "pull_model": pull_model,
        "nodes": list_nodes,
        "drain_node": drain_node,
        "undrain_node": undrain_node,
        "remove_node": remove_node,
        "history": history,
    }
