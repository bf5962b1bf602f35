"""The scheduler places a safetensors model only on nodes that run safetensors: the formats a node
reports, or (from a node that reported none) those of its runtimes."""

from __future__ import annotations

from balancer.fleet.view import Fleet, NodeInfo
from balancer.scheduler.deployment import Deployment
from balancer.scheduler.facts import ModelNeed
from balancer.scheduler.facts_from_fleet import fleet_facts
from balancer.scheduler.filters import CapabilityFilter
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rules import PASSED, Ask
from common.types import Backend, Capability, FileFormat, ManifestFile, Model, ModelSource

MODEL = Model(
    id="st",
    name="st",
    source=ModelSource.HF,
    repo_id="org/st",
    revision="",
    origin="",
    files=[
        ManifestFile("config.json", FileFormat.CONFIG, 10),
        ManifestFile("model.safetensors", FileFormat.SAFETENSORS, 1000),
    ],
    capabilities=[Capability.CHAT],
)


def test_only_nodes_that_run_safetensors_pass_the_capability_filter() -> None:
    fleet = Fleet()
    nodes = {
        "reported": NodeInfo("reported", "a", formats=frozenset({FileFormat.GGUF, FileFormat.SAFETENSORS})),
        "by-runtime": NodeInfo("by-runtime", "b", runtimes=("llama.cpp", "transformers")),
        "gguf-only": NodeInfo("gguf-only", "c", formats=frozenset({FileFormat.GGUF})),
        "old-llama": NodeInfo("old-llama", "d", runtimes=("llama.cpp",)),
    }
    for info in nodes.values():
        fleet.registered(
            NodeInfo(
                info.node_id,
                info.address,
                backends=(Backend.CPU,),
                runtimes=info.runtimes,
                formats=info.formats,
            )
        )
        fleet.connected(info.node_id)
    need = ModelNeed.of(MODEL)
    ask = Ask(Deployment(need.model_id), need, 0.0)
    facts = fleet_facts(fleet)
    verdicts = {f.id: CapabilityFilter().check(ask, f, Ledger(facts)) for f in facts}
    assert {n for n, v in verdicts.items() if v == PASSED} == {"reported", "by-runtime"}
    assert verdicts["gguf-only"] == "no runtime for safetensors files"
