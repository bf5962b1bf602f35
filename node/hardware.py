"""What compute this node has: CUDA GPUs (through NVML), Apple Silicon (Metal), or the CPU.

The result is reported to the balancer, picks which manifest files the node fetches (no ``.metal.bin``
on CUDA or CPU) and tells the runtimes how much to offload.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
from collections.abc import Callable, Mapping
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


def visible_devices(value: str | None, count: int, uuid_of: Callable[[int], str]) -> list[int]:
    """The NVML indices ``CUDA_VISIBLE_DEVICES`` leaves visible, in its order; all when it is unset.

    Entries are indices or UUIDs (``GPU-...``); as in CUDA, the list ends at the first entry naming no
    device, so ``""`` and ``"-1"`` hide every GPU. Indices are taken in PCI bus order, as nvidia-smi
    numbers devices: set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so CUDA numbers them the same way.
    """
    if value is None:
        return list(range(count))
    uuids: dict[str, int] | None = None
    visible: list[int] = []
    for entry in (e.strip() for e in value.split(",")):
        if entry.isdigit() and int(entry) < count:
            index = int(entry)
        elif entry.startswith(("GPU-", "MIG-")):
            if uuids is None:
                uuids = {uuid_of(i): i for i in range(count)}
            found = next((i for u, i in uuids.items() if u.startswith(entry)), None)
            if found is None:
                break
            index = found
        else:
            break
        if index in visible:
            break  # CUDA refuses a device named twice; stop where it would
        visible.append(index)
    return visible


def cuda_devices(nvml: Any | None = None, env: Mapping[str, str] | None = None) -> list[GpuDevice]:
    """The CUDA devices this process may use: those NVML sees, narrowed by ``CUDA_VISIBLE_DEVICES``.

    None when NVML (the driver or ``nvidia-ml-py``) is missing. ``nvml`` is the ``pynvml`` module;
    tests pass a stand-in describing a machine.
    """
    env = os.environ if env is None else env
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

        def uuid_of(index: int) -> str:
            uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index))
            return uuid.decode() if isinstance(uuid, bytes) else str(uuid)

        visible = visible_devices(env.get("CUDA_VISIBLE_DEVICES"), nvml.nvmlDeviceGetCount(), uuid_of)
        devices = []
        for index in visible:
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
    env: Mapping[str, str] | None = None,
) -> Hardware:
    """Finds the backends this machine offers; ``forced`` (``--backend``) overrides the choice.

    Order of preference: CUDA when NVML reports a device, Metal on Apple Silicon, else the CPU,
    which every node offers.
    """
    gpus = cuda_devices(nvml, env)
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


@dataclass(frozen=True, slots=True)
class Offer:
    """The memory this node offers the balancer: per device (the host's RAM, each GPU), total and free.

    Where the operator caps the node (``XLLM_MEMORY_BUDGET_MB``) the cap is what it offers, never more
    than the hardware has: the balancer places models by these figures, so a node capped at 100 MB
    must not look like one with the host's whole RAM.
    """

    memory_total_mb: int
    memory_free_mb: int
    gpus: tuple[GpuDevice, ...] = ()


def offered(hardware: Hardware, budget_mb: int, used_mb: int, host_free_mb: int | None = None) -> Offer:
    """What the node offers with ``budget_mb`` (0: no cap) when its loaded models take ``used_mb``.

    ``host_free_mb``: the RAM the host has free now (None: unknown, then the total less ``used_mb``).
    Uncapped, each GPU offers what the driver reported; capped, at most the cap less what is loaded.
    """
    host_total = hardware.memory_total_mb
    host_free = host_total - used_mb if host_free_mb is None else host_free_mb
    if budget_mb <= 0:
        return Offer(host_total, max(0, host_free), hardware.gpus)
    left = max(0, budget_mb - used_mb)
    total = min(budget_mb, host_total) if host_total else budget_mb
    gpus = tuple(
        GpuDevice(
            index=g.index,
            name=g.name,
            memory_total_mb=min(budget_mb, g.memory_total_mb),
            memory_free_mb=min(left, g.memory_free_mb) if g.memory_free_mb else left,
        )
        for g in hardware.gpus
    )
    return Offer(total, min(left, max(0, host_free)), gpus)
