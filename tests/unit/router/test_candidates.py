"""Which nodes the router considers for a model, in which tiers, and why there are none."""

from __future__ import annotations

from dataclasses import replace

from balancer.fleet.view import Fleet, NodeInfo
from balancer.router.candidates import DOWNLOADABLE, ON_DISK, READY, Candidates
from balancer.router.deployed import Deployed
from common.types import Capability, FileFormat, ManifestFile, Model, ModelOnNode, ModelSource, ModelState

MODEL = Model(
    id="org/tiny",
    name="tiny",
    source=ModelSource.HF,
    repo_id="org/tiny",
    revision="",
    origin="",
    files=[ManifestFile("tiny.gguf", FileFormat.GGUF, 1000)],
    capabilities=[Capability.CHAT],
)


def add_node(
    fleet: Fleet,
    node_id: str,
    state: str | None,
    capabilities: frozenset[Capability] = frozenset({Capability.CHAT}),
) -> None:
    fleet.registered(NodeInfo(node_id, f"127.0.0.1:{len(node_id)}", capabilities))
    fleet.connected(node_id)
    if state is not None:
        fleet.report(ModelOnNode(node_id, MODEL.id, ModelState(state)))


def test_ready_nodes_come_before_on_disk_before_downloadable():
    fleet = Fleet()
    # Registered worst first, so the order cannot come from the fleet's own ordering.
    add_node(fleet, "a-absent", None)
    add_node(fleet, "b-present", "present")
    add_node(fleet, "c-ready", "ready")
    add_node(fleet, "d-loading", "loading")

    ranked, why = Candidates(fleet).ranked(MODEL, Capability.CHAT)

    assert [(c.node_id, c.tier) for c in ranked] == [
        ("c-ready", READY),
        ("b-present", ON_DISK),
        ("d-loading", ON_DISK),
        ("a-absent", DOWNLOADABLE),
    ]
    assert why == ""


def test_nodes_without_the_capability_draining_or_failed_are_no_candidates():
    fleet = Fleet()
    add_node(fleet, "embedder", "ready", frozenset({Capability.EMBEDDING}))
    add_node(fleet, "draining", "ready")
    fleet.set_draining("draining", True)
    add_node(fleet, "broken", "failed")
    add_node(fleet, "good", "present")

    ranked, _ = Candidates(fleet).ranked(MODEL, Capability.CHAT)

    assert [c.node_id for c in ranked] == ["good"]


def test_a_download_under_way_elsewhere_starts_no_second_download():
    fleet = Fleet()
    fleet.registered(NodeInfo("fetching", "127.0.0.1:1", frozenset({Capability.CHAT})))
    fleet.connected("fetching")
    fleet.report(
        ModelOnNode("fetching", MODEL.id, ModelState.DOWNLOADING, downloaded_bytes=250, total_bytes=1000)
    )
    add_node(fleet, "idle", None)  # could download it too, but must not

    ranked, why = Candidates(fleet).ranked(MODEL, Capability.CHAT)

    assert ranked == []
    assert why == "model 'org/tiny' is downloading on fetching (25%); retry shortly"


def test_a_download_elsewhere_does_not_hide_a_node_that_has_the_model():
    fleet = Fleet()
    add_node(fleet, "fetching", "downloading")
    add_node(fleet, "has-it", "present")
    add_node(fleet, "idle", None)

    ranked, _ = Candidates(fleet).ranked(MODEL, Capability.CHAT)

    assert [c.node_id for c in ranked] == ["has-it", "idle"]


def test_why_there_are_no_candidates():
    failed = Fleet()
    failed.registered(NodeInfo("n1", "127.0.0.1:1", frozenset({Capability.CHAT})))
    failed.connected("n1")
    failed.report(ModelOnNode("n1", MODEL.id, ModelState.FAILED, error="disk full"))
    nobody = Fleet()

    _, why_failed = Candidates(failed).ranked(MODEL, Capability.CHAT)
    _, why_nobody = Candidates(nobody).ranked(MODEL, Capability.CHAT)

    assert why_failed == "model 'org/tiny' failed on every capable node: disk full"
    assert why_nobody == "no online node can serve chat for model 'org/tiny'"


def test_ranking_follows_the_fleet_once_its_version_changes():
    fleet = Fleet()
    add_node(fleet, "n1", "present")
    candidates = Candidates(fleet)
    assert [c.tier for c in candidates.ranked(MODEL, Capability.CHAT)[0]] == [ON_DISK]

    fleet.report(ModelOnNode("n1", MODEL.id, ModelState.READY))

    assert [c.tier for c in candidates.ranked(MODEL, Capability.CHAT)[0]] == [READY]
    assert candidates.serves((MODEL.id, Capability.CHAT), "n1")
    assert not candidates.serves((MODEL.id, Capability.CHAT), "n2")


def test_a_download_under_way_is_coming_so_requests_wait_for_it_but_no_node_at_all_is_not():
    fleet = Fleet()
    add_node(fleet, "fetching", "downloading")
    add_node(fleet, "idle", None)
    failed = Fleet()
    add_node(failed, "broken", "failed")

    assert Candidates(fleet).coming(MODEL, Capability.CHAT)
    assert not Candidates(Fleet()).coming(MODEL, Capability.CHAT)
    assert not Candidates(failed).coming(MODEL, Capability.CHAT)


def test_a_deployed_model_goes_to_its_copies_only_and_with_none_a_copy_is_coming():
    fleet = Fleet()
    add_node(fleet, "copy", None)
    fleet.report(ModelOnNode("copy", MODEL.id, ModelState.LOADING, pinned=True))
    add_node(fleet, "loaded-unscheduled", "ready")
    add_node(fleet, "files-only", "present")
    deployed = Deployed()
    candidates = Candidates(fleet, deployed)
    assert candidates.ranked(MODEL, Capability.CHAT)[0][0].node_id == "loaded-unscheduled"

    deployed.add(MODEL.id)  # no fleet change: the ranking is redone all the same

    assert [(c.node_id, c.tier) for c in candidates.ranked(MODEL, Capability.CHAT)[0]] == [("copy", ON_DISK)]
    fleet.report(ModelOnNode("copy", MODEL.id, ModelState.PRESENT, pinned=False))  # scaled to zero
    ranked, why = candidates.ranked(MODEL, Capability.CHAT)
    assert ranked == []
    assert candidates.coming(MODEL, Capability.CHAT)
    assert why == "no copy of model 'org/tiny' is ready yet; one is being placed"


def test_a_model_placed_by_hand_is_served_only_by_the_nodes_holding_it():
    fleet = Fleet()
    add_node(fleet, "a-absent", None)
    add_node(fleet, "b-present", "present")
    local = replace(MODEL, source=ModelSource.LOCAL, repo_id="")

    ranked, _ = Candidates(fleet).ranked(local, Capability.CHAT)

    assert [(c.node_id, c.tier) for c in ranked] == [("b-present", ON_DISK)]  # nowhere to fetch it from


def test_a_ready_node_carries_the_slots_it_reported_and_a_new_report_replaces_them():
    fleet = Fleet()
    add_node(fleet, "old", "ready")  # reports no slots: an older node
    add_node(fleet, "new", None)
    fleet.report(ModelOnNode("new", MODEL.id, ModelState.READY, slots=4))
    candidates = Candidates(fleet)

    ranked, _ = candidates.ranked(MODEL, Capability.CHAT)
    assert {c.node_id: c.slots for c in ranked} == {"new": 4, "old": 0}

    fleet.replace("new", [ModelOnNode("new", MODEL.id, ModelState.READY, slots=2)])  # loaded again
    ranked, _ = candidates.ranked(MODEL, Capability.CHAT)
    assert {c.node_id: c.slots for c in ranked} == {"new": 2, "old": 0}


def test_slots_count_only_once_the_model_is_ready():
    fleet = Fleet()
    add_node(fleet, "loading", None)
    fleet.report(ModelOnNode("loading", MODEL.id, ModelState.LOADING, slots=4))

    ranked, _ = Candidates(fleet).ranked(MODEL, Capability.CHAT)

    assert [(c.node_id, c.tier, c.slots) for c in ranked] == [("loading", ON_DISK, 0)]
