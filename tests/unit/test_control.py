"""The fleet-aware views both doors show: a model is ready on a node only while that node takes requests."""

from __future__ import annotations

from balancer.control import model_view
from balancer.fleet.view import Fleet, NodeInfo
from common.types import Capability, Model, ModelOnNode, ModelSource, ModelState

MODEL = Model(id="acme/m", name="m", source=ModelSource.HF, repo_id="acme/m", revision="", origin="")


def fleet_with(*states: tuple[str, ModelState]) -> Fleet:
    """Every node registered and connected, each holding ``MODEL`` in the given state."""
    fleet = Fleet()
    for node_id, state in states:
        fleet.registered(NodeInfo(node_id, "127.0.0.1:1", frozenset({Capability.CHAT})))
        fleet.connected(node_id)
        fleet.report(ModelOnNode(node_id, MODEL.id, state))
    return fleet


def readiness(fleet: Fleet) -> dict[str, bool]:
    return {n.node_id: n.ready for n in model_view(fleet, MODEL).nodes}


def test_a_model_loaded_on_a_node_in_rotation_is_ready_there() -> None:
    fleet = fleet_with(("a", ModelState.READY), ("b", ModelState.PRESENT))
    view = model_view(fleet, MODEL)
    assert view.ready
    assert [(n.node_id, n.ready, n.state) for n in view.nodes] == [
        ("a", True, ModelState.READY),
        ("b", False, ModelState.PRESENT),
    ]


def test_a_draining_node_is_not_ready_though_the_model_stays_loaded() -> None:
    fleet = fleet_with(("a", ModelState.READY))
    fleet.set_draining("a", True)
    view = model_view(fleet, MODEL)
    assert not view.ready and readiness(fleet) == {"a": False}
    assert view.nodes[0].state is ModelState.READY


def test_an_offline_node_is_not_ready_and_the_model_is_ready_while_another_node_serves_it() -> None:
    fleet = fleet_with(("a", ModelState.READY), ("b", ModelState.READY))
    fleet.disconnected("a")
    assert readiness(fleet) == {"a": False, "b": True}
    assert model_view(fleet, MODEL).ready
    fleet.disconnected("b")
    assert not model_view(fleet, MODEL).ready
