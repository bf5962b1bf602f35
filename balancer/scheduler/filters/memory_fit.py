"""Filter: a copy must fit whole on one device: one GPU on a GPU node, the host's RAM on a CPU node.

Of the devices it fits on, the one with the least room left that still fits is taken (best fit),
which keeps the larger free spaces whole for larger models. Free memory is the pass's ledger: the
node's report less what this pass has placed there already.
"""

from __future__ import annotations

from balancer.scheduler.facts import NodeFacts
from balancer.scheduler.ledger import Ledger
from balancer.scheduler.rules import Ask, Passed, Verdict


def gb(mb: int) -> str:
    return f"{mb / 1024:.1f} GB"


class MemoryFitFilter:
    name = "memory"
    static = False

    def check(self, ask: Ask, node: NodeFacts, ledger: Ledger) -> Verdict:
        need = ask.need.memory_mb(node, ask.deployment.memory_mb)
        kind = node.placement_kind
        best: Passed | None = None
        most = -1
        for device in node.devices:
            if device.kind is not kind:
                continue
            free = ledger.free_mb(node.id, device)
            most = max(most, free)
            if free >= need and (best is None or free < best.free_mb):
                best = Passed(device, free, need)
        if best is not None:
            return best
        if most < 0:
            return f"no {kind} device"
        return f"needs {gb(need)}, at most {gb(most)} free on one {kind} device"
