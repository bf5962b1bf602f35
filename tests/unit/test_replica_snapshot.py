"""What a replica writes about the nodes it holds, as other replicas read it back."""

from __future__ import annotations

import json

from balancer.fleet.rows import NodeSnapshot
from balancer.fleet.view import Fleet, NodeInfo, NodeLoad
from common.types import Backend, Capability, ModelOnNode, ModelState


def held_node() -> Fleet:
    fleet = Fleet()
    fleet.registered(NodeInfo("n1", "127.0.0.1:1", frozenset({Capability.CHAT, Capability.EMBEDDING})))
    fleet.connected("n1")
    fleet.replace(
        "n1",
        [
            ModelOnNode("n1", "gemma-3-270m", ModelState.READY, 10, 10),
            ModelOnNode("n1", "whisper-base", ModelState.DOWNLOADING, 3, 9),
        ],
    )
    fleet.set_load("n1", NodeLoad(2, 1, 12.5, 100, 1000))
    fleet.set_draining("n1", True)
    fleet.set_prefixes("n1", "gemma-3-270m", [0, 1, 2**64 - 1, 0x0123456789ABCDEF])
    return fleet


def test_a_snapshot_reads_back_as_written() -> None:
    written = NodeSnapshot.of(held_node(), "n1")

    read = NodeSnapshot.from_json("n1", written.to_json())

    assert read == written
    assert read.models[1] == ModelOnNode("n1", "whisper-base", ModelState.DOWNLOADING, 3, 9)


def test_values_this_version_does_not_know_are_left_out() -> None:
    """A newer replica may write a capability or a state this one has no name for."""
    body = json.loads(NodeSnapshot.of(held_node(), "n1").to_json())
    body["capabilities"].append("teleportation")
    body["models"].append(["future-model", "hibernating", 0, 0, ""])
    body["extra"] = {"from": "a newer replica"}

    read = NodeSnapshot.from_json("n1", json.dumps(body))

    assert read.capabilities == {Capability.CHAT, Capability.EMBEDDING}
    assert [m.model_id for m in read.models] == ["gemma-3-270m", "whisper-base"]


def test_progress_alone_leaves_the_routing_key_unchanged() -> None:
    fleet = held_node()
    before = NodeSnapshot.of(fleet, "n1")
    fleet.report(ModelOnNode("n1", "whisper-base", ModelState.DOWNLOADING, 6, 9))
    during = NodeSnapshot.of(fleet, "n1")
    fleet.report(ModelOnNode("n1", "whisper-base", ModelState.READY, 9, 9))
    after = NodeSnapshot.of(fleet, "n1")

    assert during.routing_key() == before.routing_key() and during.progress() != before.progress()
    assert after.routing_key() != during.routing_key()


def test_prefixes_read_back_on_another_replica_and_change_only_what_is_throttled() -> None:
    fleet = held_node()
    before = NodeSnapshot.of(fleet, "n1")
    fleet.set_prefixes("n1", "gemma-3-270m", [7, 8])
    after = NodeSnapshot.of(fleet, "n1")

    assert NodeSnapshot.from_json("n1", after.to_json()).prefixes == {"gemma-3-270m": frozenset({7, 8})}
    assert after.routing_key() == before.routing_key() and after.progress() != before.progress()

    other = Fleet()
    read = NodeSnapshot.from_json("n1", after.to_json())
    other.attached_elsewhere(
        NodeInfo("n1", "127.0.0.1:1"),
        "r2",
        models=list(read.models),
        load=read.load,
        draining=False,
        prefixes=read.prefixes,
    )
    assert other.prefixes("n1", "gemma-3-270m") == {7, 8}
    other.attached_elsewhere(
        NodeInfo("n1", "127.0.0.1:1"),
        "r2",
        models=list(read.models),
        load=read.load,
        draining=False,
        prefixes={},
    )
    assert other.prefixes("n1", "gemma-3-270m") == frozenset()


def test_what_the_scheduler_places_by_reads_back_on_another_replica() -> None:
    """The acting scheduler may not hold a node's session: its labels, offer and pinned copies travel."""
    fleet = Fleet()
    fleet.registered(
        NodeInfo(
            "n2",
            "127.0.0.1:2",
            auth_token="secret",
            labels={"zone": "a"},
            backends=(Backend.CPU,),
            runtimes=("llama.cpp",),
            memory_total_mb=3000,
        )
    )
    fleet.connected("n2")
    fleet.replace(
        "n2", [ModelOnNode("n2", "gemma-3-270m", ModelState.READY, 10, 10, memory_mb=700, pinned=True)]
    )
    fleet.set_load("n2", NodeLoad(memory_used_mb=700, memory_total_mb=3000))
    text = NodeSnapshot.of(fleet, "n2").to_json()
    assert "secret" not in text
    read = NodeSnapshot.from_json("n2", text)
    assert read.models[0].pinned and read.models[0].memory_mb == 700
    info = read.info("n2", "127.0.0.1:2")
    assert (info.labels, info.backends, info.runtimes, info.memory_total_mb) == (
        {"zone": "a"},
        (Backend.CPU,),
        ("llama.cpp",),
        3000,
    )
    assert info.auth_token == ""  # routed calls present the fleet token: its own is kept where it registered


def test_a_node_shutting_down_is_written_at_once_and_every_replica_reads_it_as_shutting_down() -> None:
    fleet = held_node()
    draining = NodeSnapshot.of(fleet, "n1")
    fleet.set_stopping("n1", True)
    stopping = NodeSnapshot.of(fleet, "n1")
    assert stopping.routing_key() != draining.routing_key()  # written at once, not with progress

    read = NodeSnapshot.from_json("n1", stopping.to_json())
    assert read.stopping and not NodeSnapshot.from_json("n1", draining.to_json()).stopping
    other = Fleet()  # another replica: the node's session is not held there
    other.attached_elsewhere(
        read.info("n1", "127.0.0.1:1"),
        "replica-a",
        models=list(read.models),
        load=read.load,
        draining=read.draining,
        stopping=read.stopping,
    )
    assert other.is_stopping("n1") and other.is_draining("n1")
    other.disconnected("n1")
    assert not other.is_stopping("n1")  # a node that comes back is a new process


def test_the_slots_a_node_reports_read_back_on_another_replica_and_a_change_is_written_at_once() -> None:
    fleet = held_node()
    before = NodeSnapshot.of(fleet, "n1")
    fleet.report(ModelOnNode("n1", "gemma-3-270m", ModelState.READY, 10, 10, slots=4))
    written = NodeSnapshot.of(fleet, "n1")

    read = NodeSnapshot.from_json("n1", written.to_json())

    assert read.models[0].slots == 4 and read.models[1].slots == 0
    assert written.routing_key() != before.routing_key()
