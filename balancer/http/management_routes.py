"""The ``/v0`` management API: register and inspect models, read manifests and statuses, list nodes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from balancer import control
from balancer.catalog import RegisterRequest
from balancer.http import openai_answers as out
from balancer.http import openai_requests as cv
from balancer.http.resources import manifest_json, model_detail_json, node_json, status_json
from balancer.http.schemas import RegisterModelBody
from balancer.parts import BalancerParts
from common.errors import unknown_capabilities
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


def management_routes(parts: BalancerParts) -> list[BaseRoute]:
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

    return [
        Route("/v0/models", register_model, methods=["POST"]),
        Route("/v0/models", list_models, methods=["GET"]),
        Route("/v0/models/registry/{model_id:path}/manifest.json", manifest, methods=["GET"]),
        Route("/v0/models/{model_id:path}/status", status, methods=["GET"]),
        Route("/v0/nodes", list_nodes, methods=["GET"]),
    ]
