"""What compute this node has: CUDA GPUs (through NVML), Apple Silicon (Metal), or the CPU.

The result is reported to the balancer, picks which manifest files the node fetches (no ``.metal.bin``
on CUDA or CPU) and tells the runtimes how much to offload.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import structlog

from common.types import Backend, GpuDevice

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Hardware:
    """The node's compute: ``backend`` is the one inference runs on, the best of ``backends``."""

    backend: Backend
    backends: tuple[Backend, ...]
    gpus: tuple[GpuDevice, ...] = field(default_factory=tuple)
    cpu_count: int = 1
    memory_total_mb: int = 0

    @property
    def gpu_memory_total_mb(self) -> int:
        return sum(g.memory_total_mb for g in self.gpus)


def cuda_devices(nvml: Any | None = None) -> list[GpuDevice]:
    """The CUDA devices NVML sees, or none when NVML (the driver or ``nvidia-ml-py``) is missing.

    ``nvml`` is the ``pynvml`` module; tests pass a stand-in describing a machine.
    """
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")  # the `cuda` extra installs nvidia-ml-py
        except ImportError:
            return []
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound and friends: no driver, so no CUDA
        return []
    try:
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                GpuDevice(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_mb=int(memory.total) // (1024 * 1024),
                    memory_free_mb=int(memory.free) // (1024 * 1024),
                )
            )
        return devices
    finally:
        with contextlib.suppress(Exception):  # a failed shutdown must not hide the devices found
            nvml.nvmlShutdown()


def is_apple_silicon(system: str | None = None, machine: str | None = None) -> bool:
    return (system or platform.system()) == "Darwin" and (machine or platform.machine()) == "arm64"


def memory_total_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        return 0


def detect(
    forced: Backend | None = None,
    *,
    nvml: Any | None = None,
    system: str | None = None,
    machine: str | None = None,
) -> Hardware:
    """Finds the backends this machine offers; ``forced`` (``--backend``) overrides the choice.

    Order of preference: CUDA when NVML reports a device, Metal on Apple Silicon, else the CPU,
    which every node offers.
    """
    gpus = cuda_devices(nvml)
    backends: list[Backend] = []
    if gpus:
        backends.append(Backend.CUDA)
    if is_apple_silicon(system, machine):
        backends.append(Backend.METAL)
    backends.append(Backend.CPU)
    backend = backends[0]
    if forced is not None and forced is not Backend.ANY:
        if forced not in backends:
            log.warning("backend_forced_unavailable", backend=forced.value, found=[b.value for b in backends])
            backends.insert(0, forced)
        backend = forced
    return Hardware(
        backend=backend,
        backends=tuple(backends),
        gpus=tuple(gpus) if backend is Backend.CUDA else (),
        cpu_count=os.cpu_count() or 1,
        memory_total_mb=memory_total_mb(),
    )
