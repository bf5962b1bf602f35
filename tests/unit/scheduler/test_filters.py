"""Each placement filter alone: which nodes it lets through, and the reason it gives for the others."""

from __future__ import annotations

from balancer.scheduler import Deployment, ModelNeed
from balancer.scheduler.filters import (
    BackoffFilter,
    CapabilityFilter,
    MemoryFitFilter,
    OnePerNodeFilter,
    OnlineFilter,
    SelectorFilter,
)
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rules import PASSED, Ask, Passed
from common.types import Backend, FileFormat
from tests.unit.scheduler.hardware import GB, GIB, cpu_node, cuda_node, gguf, gpu

MODEL = gguf("org/m-gguf", 4, required_gb=6)


def ask(need: ModelNeed = MODEL, now: float = 1_000.0, **deployment: object) -> Ask:
    return Ask(Deployment(need.model_id, **deployment), need, now)  # type: ignore[arg-type]


def test_only_an_online_node_that_is_not_draining_passes() -> None:
    rule, ledger = OnlineFilter(), Ledger([])
    assert rule.check(ask(), cuda_node("a", gpu(0, 24)), ledger) == PASSED
    assert rule.check(ask(), cuda_node("a", gpu(0, 24), online=False), ledger) == "offline"
    assert rule.check(ask(), cuda_node("a", gpu(0, 24), draining=True), ledger) == "draining"


def test_the_selector_wants_every_label_and_says_which_one_is_missing_or_different() -> None:
    rule, ledger = SelectorFilter(), Ledger([])
    node = cuda_node("a", gpu(0, 24), labels={"zone": "eu-1", "gpu": "l4", "team": "x"})
    wanted = ask(selector={"zone": "eu-1", "gpu": "l4"})

    assert rule.check(wanted, node, ledger) == PASSED  # extra labels on the node are fine
    assert rule.check(ask(), node, ledger) == PASSED  # no selector: every node
    assert (
        rule.check(ask(selector={"zone": "us-2"}), node, ledger)
        == "label zone=us-2 wanted, node has zone=eu-1"
    )
    assert (
        rule.check(ask(selector={"disk": "nvme"}), node, ledger) == "label disk=nvme wanted, node has no disk"
    )


def test_a_node_must_load_the_format_and_the_model_must_have_files_for_its_backend() -> None:
    rule, ledger = CapabilityFilter(), Ledger([])
    whisper_only = cuda_node("w", gpu(0, 24), formats=frozenset({FileFormat.WHISPER}))
    metal_only = ModelNeed("org/m-mlx", FileFormat.METAL, GIB, backends=frozenset({Backend.METAL}))
    metal_node = cuda_node("mac", gpu(0, 64), backend=Backend.METAL, formats=frozenset({FileFormat.METAL}))

    assert rule.check(ask(), cuda_node("a", gpu(0, 24)), ledger) == PASSED
    assert rule.check(ask(), whisper_only, ledger) == "no runtime for gguf files"
    cuda_with_metal = cuda_node("c", gpu(0, 80), formats=frozenset({FileFormat.METAL, FileFormat.GGUF}))
    assert rule.check(ask(metal_only), cuda_with_metal, ledger) == "no files for the cuda backend"
    assert rule.check(ask(metal_only), metal_node, ledger) == PASSED


def test_a_node_holding_a_copy_takes_no_second_one() -> None:
    rule = OnePerNodeFilter()
    node, other = cuda_node("a", gpu(0, 80)), cuda_node("b", gpu(0, 80))
    ledger = Ledger([node, other])
    ledger.book(MODEL.model_id, node, 0, 6 * GB)

    assert rule.check(ask(), node, ledger) == "holds a copy already"
    assert rule.check(ask(), other, ledger) == PASSED


def test_a_node_where_the_model_failed_is_skipped_for_the_backoff_then_tried_again() -> None:
    rule, node, ledger = BackoffFilter(300), cuda_node("a", gpu(0, 80)), Ledger([])

    def at(now: float) -> Ask:
        return Ask(Deployment(MODEL.model_id), MODEL, now, failed_on={"a": 1_000.0})

    assert rule.check(at(1_100), node, ledger) == "failed to load it 100 s ago; retried here in 200 s"
    assert rule.check(at(1_300), node, ledger) == PASSED
    assert rule.check(ask(now=1_100), node, ledger) == PASSED  # failed elsewhere only


def test_memory_fit_takes_the_tightest_gpu_the_copy_fits_on_whole() -> None:
    rule = MemoryFitFilter()
    node = cuda_node("a", gpu(0, 24, free_gb=20), gpu(1, 80, free_gb=70), gpu(2, 48, free_gb=30))
    ledger = Ledger([node])

    fit = rule.check(ask(gguf("org/m", 10, required_gb=25)), node, ledger)
    assert fit == Passed(node.devices[2], 30 * GB, 25 * GB)  # 48 GB card, not the 80 GB one
    # 75 GB is free in all but not on one device: a copy is never split across GPUs.
    assert rule.check(ask(gguf("org/m", 50, required_gb=75)), node, ledger) == (
        "needs 75.0 GB, at most 70.0 GB free on one gpu device"
    )


def test_memory_fit_places_on_ram_on_a_cpu_node_and_never_in_a_gpu_nodes_ram() -> None:
    rule = MemoryFitFilter()
    host, gpu_node = cpu_node("cpu", 32), cuda_node("small-gpu", gpu(0, 8))
    ledger = Ledger([host, gpu_node])
    big = gguf("org/m", 10, required_gb=12)

    fit = rule.check(ask(big), host, ledger)
    assert isinstance(fit, Passed) and fit.device is not None and fit.device.label == "RAM"
    assert rule.check(ask(big), gpu_node, ledger) == "needs 12.0 GB, at most 8.0 GB free on one gpu device"


def test_memory_need_is_the_override_else_the_catalogue_else_the_files_plus_the_nodes_context() -> None:
    rule = MemoryFitFilter()
    node = cuda_node("a", gpu(0, 24), context_mb=1_000)
    ledger = Ledger([node])
    estimated = gguf("org/m", 4)  # no required_vram_mb: 4 GiB x 1.1 + the node's 1,000 MB of context

    assert rule.check(ask(estimated), node, ledger) == Passed(node.devices[0], 24 * GB, 4506 + 1_000)
    assert rule.check(ask(MODEL), node, ledger) == Passed(node.devices[0], 24 * GB, 6 * GB)
    assert rule.check(ask(MODEL, memory_mb=30 * GB), node, ledger) == (
        "needs 30.0 GB, at most 24.0 GB free on one gpu device"
    )


def test_memory_fit_sees_what_the_pass_booked_on_the_device() -> None:
    rule = MemoryFitFilter()
    node = cuda_node("a", gpu(0, 24))
    ledger = Ledger([node])
    assert isinstance(rule.check(ask(gguf("org/x", 10, required_gb=14)), node, ledger), Passed)

    ledger.book("org/other", node, 0, 14 * GB)

    assert rule.check(ask(gguf("org/x", 10, required_gb=14)), node, ledger) == (
        "needs 14.0 GB, at most 10.0 GB free on one gpu device"
    )
