"""The scheduler's facts as the live fleet gives them: a capped node offers its budget, its labels and
runtimes say where a model may go, and the copies are the models nodes report pinned."""

from __future__ import annotations

from balancer.fleet.view import Fleet, NodeInfo, NodeLoad
from balancer.scheduler.facts import CopyState, DeviceKind
from balancer.scheduler.facts_from_fleet import fleet_facts, pinned_copies
from common.types import Backend, FileFormat, GpuDevice, ModelOnNode, ModelState


def fleet_of_two() -> Fleet:
    fleet = Fleet()
    fleet.registered(
        NodeInfo(
            "small",
            "127.0.0.1:1",
            labels={"zone": "a"},
            backends=(Backend.CPU,),
            runtimes=("llama.cpp", "faster-whisper"),
            memory_total_mb=300,  # XLLM_MEMORY_BUDGET_MB=300 on a host with 24 GB
        )
    )
    fleet.connected("small")
    fleet.set_load(
        "small", NodeLoad(active_requests=1, queued_requests=2, memory_used_mb=0, memory_total_mb=300)
    )
    fleet.registered(
        NodeInfo(
            "gpu",
            "127.0.0.1:2",
            backends=(Backend.CUDA, Backend.CPU),
            runtimes=("llama.cpp",),
            gpus=(GpuDevice(0, "L4", 23034, 23000),),
            memory_total_mb=64000,
        )
    )
    fleet.connected("gpu")
    fleet.set_draining("gpu", True)
    fleet.set_load(
        "gpu",
        NodeLoad(memory_used_mb=700, memory_total_mb=4000, gpus=(GpuDevice(0, "L4", 4000, 3300),)),
    )
    fleet.replace(
        "gpu",
        [
            ModelOnNode("gpu", "gemma", ModelState.READY, memory_mb=700, pinned=True),
            ModelOnNode("gpu", "other", ModelState.PRESENT),
            ModelOnNode("gpu", "big", ModelState.DOWNLOADING, 10, 100, pinned=True),
        ],
    )
    fleet.registered(NodeInfo("gone", "127.0.0.1:3", backends=(Backend.CPU,), memory_total_mb=8000))
    return fleet


def test_each_node_offers_what_it_reports_with_its_labels_formats_and_models() -> None:
    small, gone, gpu = sorted(fleet_facts(fleet_of_two()), key=lambda n: ["small", "gone", "gpu"].index(n.id))
    assert small.labels == {"zone": "a"} and small.formats == {FileFormat.GGUF, FileFormat.WHISPER}
    assert [(d.kind, d.total_mb, d.free_mb) for d in small.devices] == [(DeviceKind.CPU, 300, 300)]
    assert small.online and not small.draining and small.load == 3
    assert gone.online is False  # registered, never connected: its copies are placed elsewhere
    assert gpu.draining and gpu.placement_kind is DeviceKind.GPU
    gpu_device = next(d for d in gpu.devices if d.kind is DeviceKind.GPU)
    assert (gpu_device.total_mb, gpu_device.free_mb, dict(gpu_device.used_mb)) == (4000, 3300, {"gemma": 700})
    assert gpu.loaded == {"gemma"} and gpu.on_disk == {"gemma", "other"} and set(gpu.downloading) == {"big"}


def test_the_copies_are_the_models_nodes_report_pinned() -> None:
    fleet = fleet_of_two()
    copies = pinned_copies(fleet, fleet_facts(fleet), since=5.0)
    assert {k: (c.state, c.since) for k, c in copies.items()} == {
        ("gemma", "gpu"): (CopyState.READY, 5.0),
        ("big", "gpu"): (CopyState.DOWNLOADING, 5.0),
    }
