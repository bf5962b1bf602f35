"""The scheduler's core on a simulated fleet: 1,000 nodes, 300 deployments, no sockets.

Nodes: CPU-only hosts (64 or 128 GB of RAM) and CUDA nodes with GPUs of 8, 24, 48 or 80 GB, in
four zones; the nodes of zone z0 share a dir holding 30 of the models, and a few nodes hold some
models on disk. Deployments: one per model, of seven sizes (0.3 to 40 GB of gguf files, 1 to 46 GB
of memory), fixed counts of 1 to 64 copies or autoscaled 1..4, a tenth limited to one zone by a
selector. Two fleets: a roomy one (one or two GPUs a node) where every copy fits, and a packed one
(more large models, mostly one GPU a node) where not every copy does.

Each pass's plan is carried out at once; a placed copy is ready when its estimate says (fetch plus
load), its memory then reported used by its node, its files then on disk. The simulated clock jumps
from pass to pass: 1 s after a pass that acted, else to the next copy becoming ready.

Measured: the passes and the scheduler's CPU time until nothing is left to do and every copy
answers (and that simulated time), from an empty fleet and again after 10 % of the nodes vanish; the
CPU of a pass with nothing to do; and the copies placed against a first-fit-decreasing bound the
bench computes itself (every wanted copy, largest first, on the first node that passes the same
filters and has a device it fits on).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from balancer.scheduler import (
    Copy,
    CopyState,
    Deployment,
    DeviceFacts,
    DeviceKind,
    Download,
    ModelNeed,
    NodeFacts,
    Place,
    Plan,
    Rates,
    Reconciler,
    Source,
)
from common.types import Backend, FileFormat

NODES = 1_000
DEPLOYMENTS = 300
SEED = 7
VANISH = 0.10
ZONES = ("z0", "z1", "z2", "z3")
GIB = 1024**3
# (files GB, memory GB, share of deployments); the roomy fleet fits every copy, the packed one not
ROOMY = ((0.3, 1, 10), (0.8, 1.5, 20), (2, 3.5, 20), (4.9, 7, 20), (9, 12, 12), (19, 24, 10), (40, 46, 8))
PACKED = ((0.3, 1, 10), (0.8, 1.5, 15), (2, 3.5, 15), (4.9, 7, 20), (9, 12, 15), (19, 24, 13), (40, 46, 12))
COPIES = (1, 2, 4, 8, 16, 32, 64)
GGUF = frozenset({FileFormat.GGUF})


@dataclass
class SimNode:
    """A node's mutable state in the simulation; ``facts`` is what it reports each pass."""

    id: str
    backend: Backend
    devices: list[tuple[DeviceKind, int, int]]  # kind, index, total MB
    zone: str
    shared: frozenset[str] = frozenset()
    on_disk: set[str] = field(default_factory=set)
    used: dict[int, dict[str, int]] = field(default_factory=dict)  # device -> model -> MB

    def facts(self, downloading: dict[str, Download]) -> NodeFacts:
        devices = []
        for kind, index, total in self.devices:
            used = self.used.get(index, {})
            devices.append(DeviceFacts(kind, index, total, total - sum(used.values()), dict(used)))
        loaded = frozenset(m for used in self.used.values() for m in used)
        return NodeFacts(
            self.id,
            self.backend,
            GGUF,
            tuple(devices),
            labels={"zone": self.zone},
            on_disk=frozenset(self.on_disk),
            shared=self.shared,
            loaded=loaded,
            downloading=downloading,
        )


def _fleet(rng: random.Random, models: list[str], gpus: tuple[int, ...]) -> list[SimNode]:
    nodes = []
    for i in range(NODES):
        zone = ZONES[i % len(ZONES)]
        draw = rng.random()
        if draw < 0.15:
            kind, backend, sizes = DeviceKind.CPU, Backend.CPU, [rng.choice((64, 128)) * 1024]
        else:
            gb = 8 if draw < 0.40 else 24 if draw < 0.65 else 48 if draw < 0.85 else 80
            kind, backend = DeviceKind.GPU, Backend.CUDA
            sizes = [gb * 1024] * rng.choice(gpus)
        node = SimNode(
            f"node-{i:04d}",
            backend,
            [(kind, index, size) for index, size in enumerate(sizes)],
            zone,
            shared=frozenset(models[:30]) if zone == "z0" else frozenset(),
        )
        node.on_disk.update(m for m in models if rng.random() < 0.01)
        nodes.append(node)
    return nodes


def _deployments(
    rng: random.Random, sizes: tuple[tuple[float, float, int], ...]
) -> tuple[list[Deployment], dict[str, ModelNeed]]:
    deployments, needs = [], {}
    weights = [share for *_, share in sizes]
    for i in range(DEPLOYMENTS):
        files_gb, memory_gb, _ = rng.choices(sizes, weights)[0]
        model_id = f"org/model-{i:03d}-gguf"
        needs[model_id] = ModelNeed(model_id, FileFormat.GGUF, int(files_gb * GIB), int(memory_gb * 1024))
        selector = {"zone": rng.choice(ZONES)} if rng.random() < 0.1 else {}
        if rng.random() < 0.2:
            deployments.append(
                Deployment(model_id, copies=None, min_copies=1, max_copies=4, selector=selector)
            )
        else:
            deployments.append(Deployment(model_id, copies=rng.choice(COPIES), selector=selector))
    return deployments, needs


def ffd_bound(deployments: list[Deployment], needs: dict[str, ModelNeed], nodes: list[NodeFacts]) -> int:
    """Copies first-fit-decreasing places: every wanted copy, largest first, on the first node (by id)
    that is online, matches the selector, runs the format, holds no copy yet and has a device it fits on."""
    wanted = sorted(
        ((needs[d.model_id].required_mb, d) for d in deployments for _ in range(max(d.floor, 1))),
        key=lambda pair: (-pair[0], pair[1].model_id),
    )
    free = {(n.id, d.index): d.total_mb for n in nodes for d in n.devices if d.kind is n.placement_kind}
    holds: set[tuple[str, str]] = set()
    placed = 0
    for need_mb, deployment in wanted:
        for node in nodes:
            if (
                not node.online
                or (deployment.model_id, node.id) in holds
                or not deployment.matches(node.labels)
            ):
                continue
            device = next((d for d in node.devices if free.get((node.id, d.index), -1) >= need_mb), None)
            if device is not None:
                free[(node.id, device.index)] -= need_mb
                holds.add((deployment.model_id, node.id))
                placed += 1
                break
    return placed


class Simulation:
    def __init__(self, sizes: tuple[tuple[float, float, int], ...], gpus: tuple[int, ...]) -> None:
        rng = random.Random(SEED)
        self.deployments, self.needs = _deployments(rng, sizes)
        self.nodes = {n.id: n for n in _fleet(rng, list(self.needs), gpus)}
        self.now = 0.0
        self.reconciler = Reconciler(lambda: self.now)
        self.copies: dict[tuple[str, str], Copy] = {}
        self.ready_at: dict[tuple[str, str], float] = {}
        self.rates = Rates()
        self.sources: Counter[Source] = Counter()

    def facts(self) -> list[NodeFacts]:
        downloading: dict[str, dict[str, Download]] = {}
        for (model_id, node_id), copy in self.copies.items():
            if copy.state is CopyState.DOWNLOADING:
                size = self.needs[model_id].size_bytes
                downloading.setdefault(node_id, {})[model_id] = Download(
                    0, size, self.rates.rate(Source.PEER)
                )
        return [n.facts(downloading.get(n.id, {})) for n in self.nodes.values()]

    def apply(self, plan: Plan) -> None:
        for action in plan.actions:
            key = (action.model_id, action.node_id)
            if isinstance(action, Place):
                self.copies[key] = Copy(
                    action.model_id,
                    action.node_id,
                    action.device,
                    CopyState.DOWNLOADING,
                    self.now,
                    self.now,
                    action.estimate.seconds,
                )
                self.ready_at[key] = self.now + action.estimate.seconds
                self.sources[action.estimate.source] += 1
            else:
                self.copies.pop(key, None)
                self.ready_at.pop(key, None)
                node = self.nodes.get(action.node_id)
                if node is not None:
                    for used in node.used.values():
                        used.pop(action.model_id, None)

    def advance(self) -> None:
        """Copies whose time has come are ready: their node reports the memory and the files."""
        for key, at in list(self.ready_at.items()):
            if at <= self.now:
                copy = self.copies[key]
                node = self.nodes[copy.node_id]
                node.used.setdefault(copy.device, {})[copy.model_id] = self.needs[copy.model_id].required_mb
                node.on_disk.add(copy.model_id)
                self.copies[key] = Copy(
                    copy.model_id,
                    copy.node_id,
                    copy.device,
                    CopyState.READY,
                    self.now,
                    copy.placed_at,
                    copy.estimate_s,
                )
                del self.ready_at[key]

    def converge(self) -> tuple[int, float, float, float]:
        """Passes until nothing is left to do; returns (passes, CPU s in total, CPU s of the
        slowest pass, simulated seconds until every copy is ready)."""
        start = self.now
        passes, cpu, slowest = 0, 0.0, 0.0
        while True:
            facts = self.facts()
            began = time.process_time()
            plan = self.reconciler.plan(
                self.deployments, facts, list(self.copies.values()), self.needs, rates=self.rates
            )
            spent = time.process_time() - began
            passes, cpu, slowest = passes + 1, cpu + spent, max(slowest, spent)
            self.apply(plan)
            if plan.actions:
                self.now += 1.0
            elif self.ready_at:
                self.now = max(self.now + 1.0, min(self.ready_at.values()))
            else:
                return passes, cpu, slowest, self.now - start
            self.advance()

    def placed(self) -> int:
        return len(self.copies)

    def wanted(self) -> int:
        return sum(max(d.floor, 1) for d in self.deployments)


async def run() -> str:
    sim = Simulation(ROOMY, (1, 2))
    first = sim.converge()
    placed_first = sim.placed()
    bound_first = ffd_bound(sim.deployments, sim.needs, sim.facts())
    sources_first = dict(sim.sources)

    steady = []
    for _ in range(20):
        facts = sim.facts()
        copies = list(sim.copies.values())
        began = time.process_time()
        plan = sim.reconciler.plan(sim.deployments, facts, copies, sim.needs, rates=sim.rates)
        steady.append(time.process_time() - began)
        assert not plan.actions

    rng = random.Random(SEED + 1)
    vanished = set(rng.sample(sorted(sim.nodes), int(NODES * VANISH)))
    lost = sum(1 for _, node_id in sim.copies if node_id in vanished)
    for node_id in vanished:
        del sim.nodes[node_id]
    sim.sources.clear()
    again = sim.converge()
    placed_after = sim.placed()
    bound_after = ffd_bound(sim.deployments, sim.needs, sim.facts())
    sources_after = dict(sim.sources)

    packed = Simulation(PACKED, (1, 1, 2))
    tight = packed.converge()
    placed_tight = packed.placed()
    bound_tight = ffd_bound(packed.deployments, packed.needs, packed.facts())
    short_steady, short = [], 0
    for _ in range(10):
        facts, copies = packed.facts(), list(packed.copies.values())
        began = time.process_time()
        plan = packed.reconciler.plan(packed.deployments, facts, copies, packed.needs, rates=packed.rates)
        short_steady.append(time.process_time() - began)
        short = len(plan.shortfalls)

    def row(name: str, wanted: int, result: tuple[int, float, float, float], placed: int, bound: int) -> str:
        passes, cpu, slowest, simulated = result
        return (
            f"| {name} | {passes} | {cpu:.2f} | {slowest * 1000:.0f} | {simulated:,.0f} | "
            f"{wanted:,} | {placed:,} | {bound:,} | {placed / bound:.1%} |"
        )

    def mix(sources: dict[Source, int]) -> str:
        return ", ".join(
            f"{source} {count}" for source, count in sorted(sources.items(), key=lambda s: -s[1])
        )

    return "\n".join(
        [
            "## Scheduler: placement on a simulated fleet",
            "",
            f"{NODES:,} simulated nodes (CPU-only with 64 or 128 GB of RAM, and CUDA nodes with 8, 24, 48 "
            f"or 80 GB GPUs, in {len(ZONES)} zones) and {DEPLOYMENTS} deployments of models needing 1 to "
            "46 GB; the scheduler's own code, no sockets (`bench/bench_scheduler.py`). Each plan is carried "
            "out at once and a copy is ready when its estimate says; the clock is simulated. Passes: until "
            "nothing is left to do and every copy answers. CPU: the process time of `Reconciler.plan` alone. "
            "Bound: first-fit-decreasing over the same filters, computed by the bench. Roomy: GPU nodes "
            "with one or two GPUs, every copy fits; packed: more large models on mostly one-GPU nodes, not "
            "every copy fits.",
            "",
            "| fleet, step | passes | scheduler CPU s | slowest pass ms | simulated s until all ready "
            "| copies wanted | placed | FFD bound | placed / bound |",
            "|---|---|---|---|---|---|---|---|---|",
            row("roomy, from empty", sim.wanted(), first, placed_first, bound_first),
            row(
                f"roomy, after {VANISH:.0%} of the nodes vanish ({lost} copies lost)",
                sim.wanted(),
                again,
                placed_after,
                bound_after,
            ),
            row("packed, from empty", packed.wanted(), tight, placed_tight, bound_tight),
            "",
            f"- a pass with nothing to do (roomy, {placed_first:,} copies on {NODES:,} nodes): "
            f"{statistics.median(steady) * 1000:.1f} ms CPU at p50, {max(steady) * 1000:.1f} ms at most "
            f"({len(steady)} passes); packed, with {short} deployments short and retried each pass: "
            f"{statistics.median(short_steady) * 1000:.1f} ms at p50, {max(short_steady) * 1000:.1f} ms at "
            f"most ({len(short_steady)} passes)",
            f"- where the files came from, roomy from empty: {mix(sources_first)}; after the loss: "
            f"{mix(sources_after)}",
            f"- the machine's load average (1 min) when the bench ended: {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} CPUs: CPU times are inflated on a shared machine",
            "",
        ]
    )
