"""A model goes only to nodes that can run its weights: a safetensors model to nodes that report the
safetensors format (transformers or vLLM), never to a llama.cpp-only node."""

from __future__ import annotations

from balancer.fleet.view import Fleet, NodeInfo
from balancer.router.candidates import Candidates
from common.types import Capability, FileFormat, ManifestFile, Model, ModelSource

SAFETENSORS = Model(
    id="org/tiny-st",
    name="tiny",
    source=ModelSource.HF,
    repo_id="org/tiny-st",
    revision="",
    origin="",
    files=[
        ManifestFile("config.json", FileFormat.CONFIG, 10),
        ManifestFile("model.safetensors", FileFormat.SAFETENSORS, 1000),
    ],
    capabilities=[Capability.CHAT],
)
CHAT = frozenset({Capability.CHAT, Capability.COMPLETION})


def add_node(
    fleet: Fleet, node_id: str, *, formats: frozenset[FileFormat] = frozenset(), runtimes=()
) -> None:
    fleet.registered(NodeInfo(node_id, "127.0.0.1:1", CHAT, runtimes=tuple(runtimes), formats=formats))
    fleet.connected(node_id)


def test_a_safetensors_model_goes_only_to_nodes_that_run_safetensors():
    fleet = Fleet()
    add_node(fleet, "gguf-only", formats=frozenset({FileFormat.GGUF}))
    add_node(fleet, "both", formats=frozenset({FileFormat.GGUF, FileFormat.SAFETENSORS}))

    ranked, _ = Candidates(fleet).ranked(SAFETENSORS, Capability.CHAT)

    assert [c.node_id for c in ranked] == ["both"]


def test_a_fleet_that_runs_no_safetensors_says_so_and_what_it_runs():
    fleet = Fleet()
    add_node(fleet, "llama", formats=frozenset({FileFormat.GGUF}))
    add_node(fleet, "voice", formats=frozenset({FileFormat.ONNX}))

    ranked, why = Candidates(fleet).ranked(SAFETENSORS, Capability.CHAT)

    assert ranked == []
    assert why == "no node can run safetensors models (model 'org/tiny-st'); nodes run: gguf, onnx"


def test_a_node_that_registered_without_formats_is_judged_by_its_runtimes():
    fleet = Fleet()
    add_node(fleet, "old-llama", runtimes=("llama.cpp",))
    add_node(fleet, "old-transformers", runtimes=("llama.cpp", "transformers"))
    add_node(fleet, "unknown")  # seen through another replica: nothing known, so not ruled out

    ranked, _ = Candidates(fleet).ranked(SAFETENSORS, Capability.CHAT)

    assert sorted(c.node_id for c in ranked) == ["old-transformers", "unknown"]
