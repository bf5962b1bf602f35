"""``/v0/models/{id}/deployment`` (set, read, end), ``/v0/deployments`` (all of them),
``/v0/models/{id}/placement`` (explain) and ``/v0/events`` (the scheduler's recent decisions): the
HTTP door of ``balancer.deployments``."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from balancer import deployments
from balancer.http import openai_answers as out
from balancer.http import openai_requests as cv
from balancer.http.route_table import Handlers
from balancer.http.schemas import DeploymentBody
from balancer.parts import BalancerParts
from balancer.scheduler.plan import Explanation


def deployment_json(view: deployments.DeploymentView) -> dict[str, Any]:
    d = view.deployment
    return {
        "model_id": d.model_id,
        "copies": d.copies,
        "min_copies": d.min_copies,
        "max_copies": d.max_copies,
        "selector": dict(d.selector),
        "memory_mb": d.memory_mb,
        "desired_copies": view.desired,
        "ready_copies": view.ready,
        "nodes": [{"node_id": c.node_id, "state": c.state.value, "ready": c.ready} for c in view.nodes],
        "created_at": d.created_at.isoformat() if d.created_at else None,
        "updated_at": d.updated_at.isoformat() if d.updated_at else None,
    }


def placement_json(explanation: Explanation) -> dict[str, Any]:
    return {
        "model_id": explanation.model_id,
        "target": explanation.target,
        "active": explanation.active,
        "nodes": [
            {
                "node_id": v.node_id,
                "excluded": v.candidate is None,
                "rule": v.rule,
                "reason": v.reason,
                "rank": v.rank,
                "text": v.text(),
            }
            for v in explanation.nodes
        ],
        "decisions": [{"at": d.at, "node_id": d.node_id, "text": d.text} for d in explanation.decisions],
    }


def deployment_routes(parts: BalancerParts) -> Handlers:
    """Setting and ending a deployment needs an ``admin`` key, reading one an ``api`` key."""

    def answer(payload: object, status: int = 200) -> Response:
        return Response(out.dumps(payload), status_code=status, media_type="application/json")

    async def put(request: Request) -> Response:
        body = cv.parse_body(DeploymentBody, await request.body() or b"{}")
        ask = deployments.DeploymentAsk(
            model_id=request.path_params["model_id"],
            copies=body.copies,
            min_copies=body.min_copies,
            max_copies=body.max_copies,
            selector=body.selector,
            memory_mb=body.memory_mb,
        )
        return answer(deployment_json(await deployments.set_deployment(parts, ask)))

    async def get(request: Request) -> Response:
        view = await deployments.get_deployment(parts, request.path_params["model_id"])
        return answer(deployment_json(view))

    async def list_all(request: Request) -> Response:
        views = await deployments.list_deployments(parts)
        return answer({"object": "list", "data": [deployment_json(views[m]) for m in sorted(views)]})

    async def delete(request: Request) -> Response:
        model_id = await deployments.delete_deployment(parts, request.path_params["model_id"])
        return answer({"model_id": model_id, "deleted": True})

    async def placement(request: Request) -> Response:
        return answer(placement_json(deployments.explain(parts, request.path_params["model_id"])))

    async def events(request: Request) -> Response:
        scheduler = parts.scheduler
        found = scheduler.events() if scheduler is not None else []
        return answer(
            {
                "acting": scheduler is not None and scheduler.acting,
                "data": [
                    {
                        "at": e.at.isoformat(),
                        "action": e.action,
                        "model_id": e.model_id,
                        "node_id": e.node_id,
                        "reason": e.reason,
                        "estimate_s": e.estimate_s,
                        "actual_s": e.actual_s,
                        "outcome": e.outcome,
                    }
                    for e in found
                ],
            }
        )

    return {
        "put_deployment": put,
        "get_deployment": get,
        "delete_deployment": delete,
        "placement": placement,
        "deployments": list_all,
        "events": events,
    }
