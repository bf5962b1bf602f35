"""Deployment operations both doors share: set, read, list and end a model's deployment.

Transport-neutral: the gRPC ``Registry`` servicer and the HTTP routes convert these plain views. A
deployment is stored (and so seen by every replica); the acting replica's scheduler
(``balancer.scheduler.loop``) reads the store each pass and places or removes copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from balancer.control import in_rotation
from balancer.parts import BalancerParts
from balancer.scheduler.deployment import Deployment
from balancer.scheduler.plan import Explanation
from common.errors import ErrorCode, LlmlbError
from common.model_id import normalize_model_id
from common.types import ModelState

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CopyView:
    """One scheduled copy as its node reports it: pinned there, in ``state``; ``ready`` when it is
    loaded and the node is in rotation (it counts toward the deployment's ready copies)."""

    node_id: str
    state: ModelState
    ready: bool


@dataclass(frozen=True, slots=True)
class DeploymentView:
    """A deployment with the copies it wants now and those ready now (pinned, loaded, in rotation);
    ``nodes``: every copy a node reports pinned, whatever its state."""

    deployment: Deployment
    desired: int
    ready: int
    nodes: tuple[CopyView, ...] = ()


@dataclass(frozen=True, slots=True)
class DeploymentAsk:
    """What a caller asks for, before it is checked: a fixed ``copies``, or ``min_copies``..``max_copies``."""

    model_id: str
    copies: int | None = None
    min_copies: int = 0
    max_copies: int | None = None
    selector: Mapping[str, str] | None = None
    memory_mb: int | None = None


def copies(parts: BalancerParts, model_id: str) -> tuple[CopyView, ...]:
    """The scheduled copies of ``model_id`` (the nodes report them pinned), by node id."""
    fleet = parts.fleet
    return tuple(
        CopyView(s.node_id, s.state, s.state is ModelState.READY and in_rotation(fleet, s.node_id))
        for s in fleet.model_nodes(model_id)
        if s.pinned
    )


def ready_copies(parts: BalancerParts, model_id: str) -> int:
    """Scheduled copies of ``model_id`` loaded on nodes in rotation (the nodes report them pinned)."""
    return sum(1 for c in copies(parts, model_id) if c.ready)


def view(parts: BalancerParts, deployment: Deployment) -> DeploymentView:
    scheduler = parts.scheduler
    desired = scheduler.desired(deployment) if scheduler is not None else deployment.floor
    placed = copies(parts, deployment.model_id)
    return DeploymentView(deployment, desired, sum(1 for c in placed if c.ready), placed)


async def set_deployment(parts: BalancerParts, ask: DeploymentAsk) -> DeploymentView:
    """Stores the deployment of a catalogue model (replacing its previous one); the scheduler acts on it.

    ``invalid_model_id`` / ``model_not_found`` for a model not in the catalogue, ``invalid_request``
    when the counts or the selector make no sense.
    """
    model = await parts.catalog.get(ask.model_id)
    copies = ask.copies
    if copies is None and ask.max_copies is None:
        copies = 1  # neither given: one copy, as `llmlb models deploy ID` alone asks for
    try:
        deployment = Deployment(
            model_id=model.id,
            copies=copies,
            min_copies=ask.min_copies,
            max_copies=ask.max_copies,
            selector=dict(ask.selector or {}),
            memory_mb=ask.memory_mb or None,
        )
    except ValueError as exc:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, str(exc)) from None
    stored = await parts.store.put_deployment(deployment)
    log.info(
        "deployment.set",
        model_id=stored.model_id,
        copies=stored.copies,
        min_copies=stored.min_copies,
        max_copies=stored.max_copies,
        selector=dict(stored.selector),
    )
    parts.router.deployed.add(stored.model_id)
    if parts.scheduler is not None:
        parts.scheduler.wake()
    return view(parts, stored)


async def get_deployment(parts: BalancerParts, model_id: str) -> DeploymentView:
    """The model's deployment; ``model_not_found`` when it has none."""
    normal = normalize_model_id(model_id)
    deployment = await parts.store.get_deployment(normal)
    if deployment is None:
        raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {normal!r} has no deployment")
    return view(parts, deployment)


async def list_deployments(parts: BalancerParts) -> dict[str, DeploymentView]:
    """Every deployment, by model id."""
    return {d.model_id: view(parts, d) for d in await parts.store.list_deployments()}


async def delete_deployment(parts: BalancerParts, model_id: str) -> str:
    """Ends the model's deployment: the scheduler unloads its copies (their files stay). Its id."""
    normal = normalize_model_id(model_id)
    if not await parts.store.delete_deployment(normal):
        raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {normal!r} has no deployment")
    log.info("deployment.deleted", model_id=normal)
    parts.router.deployed.discard(normal)
    if parts.scheduler is not None:
        parts.scheduler.wake()
    return normal


def explain(parts: BalancerParts, model_id: str) -> Explanation:
    """The scheduler's last verdict on every node for a deployed model; ``model_not_found`` otherwise."""
    normal = normalize_model_id(model_id)
    scheduler = parts.scheduler
    try:
        if scheduler is None:
            raise KeyError(normal)
        return scheduler.explain(normal)
    except KeyError:
        raise LlmlbError(
            ErrorCode.MODEL_NOT_FOUND, f"model {normal!r} has no deployment the scheduler has seen yet"
        ) from None
