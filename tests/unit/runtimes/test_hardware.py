"""Backend detection from hardware descriptions: a fake NVML module, Apple Silicon, a plain CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from common.types import Backend
from node.hardware import detect


@dataclass
class _Memory:
    total: int
    free: int


class FakeNvml:
    """Stands in for ``pynvml``, describing the GPUs of one machine."""

    def __init__(self, gpus: list[tuple[str, int, int]], *, driver: bool = True) -> None:
        self.gpus = gpus
        self.driver = driver
        self.shut_down = False

    def nvmlInit(self) -> None:
        if not self.driver:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return self.gpus[handle][0].encode()  # older bindings return bytes

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:08x}-5eed-4c1e-9a1b-0123456789ab"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:
        _, total_mb, free_mb = self.gpus[handle]
        return _Memory(total=total_mb * 1024 * 1024, free=free_mb * 1024 * 1024)


TWO_GPUS = FakeNvml([("NVIDIA H100 80GB HBM3", 81559, 80000), ("NVIDIA L4", 23034, 22000)])
NO_DRIVER = FakeNvml([], driver=False)


def test_two_cuda_gpus_make_cuda_the_backend_with_both_devices() -> None:
    hw = detect(nvml=TWO_GPUS, system="Linux", machine="x86_64")
    assert hw.backend is Backend.CUDA
    assert hw.backends == (Backend.CUDA, Backend.CPU)
    assert [(g.index, g.name, g.memory_total_mb, g.memory_free_mb) for g in hw.gpus] == [
        (0, "NVIDIA H100 80GB HBM3", 81559, 80000),
        (1, "NVIDIA L4", 23034, 22000),
    ]
    assert hw.gpu_memory_total_mb == 81559 + 23034


def test_apple_silicon_runs_on_metal() -> None:
    hw = detect(nvml=NO_DRIVER, system="Darwin", machine="arm64")
    assert hw.backend is Backend.METAL
    assert hw.backends == (Backend.METAL, Backend.CPU)
    assert hw.gpus == ()


def test_intel_mac_is_cpu_only() -> None:
    assert detect(nvml=NO_DRIVER, system="Darwin", machine="x86_64").backends == (Backend.CPU,)


def test_plain_cpu_machine_without_nvidia_driver() -> None:
    hw = detect(nvml=NO_DRIVER, system="Linux", machine="x86_64")
    assert hw.backend is Backend.CPU
    assert hw.backends == (Backend.CPU,)
    assert hw.gpus == ()
    assert hw.cpu_count >= 1


def test_driver_present_but_no_gpu_is_cpu() -> None:
    assert detect(nvml=FakeNvml([]), system="Linux", machine="x86_64").backend is Backend.CPU


def test_forcing_cpu_on_a_gpu_machine_hides_the_gpus() -> None:
    hw = detect(Backend.CPU, nvml=TWO_GPUS, system="Linux", machine="x86_64")
    assert hw.backend is Backend.CPU
    assert Backend.CUDA in hw.backends
    assert hw.gpus == ()


def test_forcing_a_backend_the_machine_lacks_is_honoured_and_listed() -> None:
    hw = detect(Backend.CUDA, nvml=NO_DRIVER, system="Linux", machine="x86_64")
    assert hw.backend is Backend.CUDA
    assert hw.backends[0] is Backend.CUDA


@pytest.mark.parametrize("forced", [None, Backend.ANY])
def test_no_forcing_or_any_keeps_the_best_backend(forced: Backend | None) -> None:
    assert detect(forced, nvml=TWO_GPUS, system="Linux", machine="x86_64").backend is Backend.CUDA


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, [0, 1]),
        ("1", [1]),
        ("1,0", [1, 0]),
        ("GPU-00000001", [1]),  # a UUID prefix, as CUDA accepts
        ("0,7,1", [0]),  # the list ends at the first device that does not exist
        ("", []),
        ("-1", []),
    ],
)
def test_cuda_visible_devices_narrows_what_the_node_reports(visible: str | None, expected: list[int]) -> None:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    hw = detect(nvml=TWO_GPUS, system="Linux", machine="x86_64", env=env)
    assert [g.index for g in hw.gpus] == expected
    assert hw.backend is (Backend.CUDA if expected else Backend.CPU)
