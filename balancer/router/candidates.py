"""Which nodes could serve a model's capability, ranked by how soon each could answer.

Candidates are online, non-draining nodes whose runtimes serve the capability and run the model's
weight format (a safetensors model goes only to nodes with transformers or vLLM; ``Fleet.online()``
already leaves out draining nodes). They come in tiers: the model loaded (or loading), then on disk,
then to be downloaded (never for a model placed by hand: only the nodes holding it serve it). A node
where the model is downloading or failed is no candidate; while a download is under way somewhere
and no node has the model, no other node is sent to download it too: the request waits for that
download instead (``coming``). A model with a deployment (``deployed``) is served by its copies only,
the nodes that keep it pinned; with none ready, its request waits for one.
The ranking is kept per (model, capability) until the fleet's version changes, so the hot path reads a
dict, not the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass

from balancer.fleet.view import Fleet
from balancer.router.deployed import Deployed
from common.formats import WEIGHT_FORMATS, weight_formats
from common.types import Capability, FileFormat, Model, ModelOnNode, ModelSource, ModelState

# Tiers: how soon a node can answer for the model. Lower is better.
READY, ON_DISK, DOWNLOADABLE = 0, 1, 2
_TIER = {
    ModelState.READY: READY,
    ModelState.LOADING: ON_DISK,
    ModelState.PRESENT: ON_DISK,
    ModelState.ABSENT: DOWNLOADABLE,
}

Key = tuple[str, Capability]  # (model id, capability)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A node that could serve a request, and its tier for the model."""

    node_id: str
    address: str
    tier: int
    slots: int = 0  # sequences the node runs at once for the model, as it reported; 0: not reported


class Candidates:
    """Ranked candidate lists per (model, capability), cached on ``fleet.version``."""

    def __init__(self, fleet: Fleet, deployed: Deployed | None = None) -> None:
        self._fleet = fleet
        self._deployed = deployed if deployed is not None else Deployed()
        self._cache: dict[Key, tuple[tuple[int, int], list[Candidate], str, bool]] = {}

    def ranked(self, model: Model, capability: Capability) -> tuple[list[Candidate], str]:
        """Nodes that could serve the request, best tier first, and why there are none when so."""
        cached = self._ranking(model, capability)
        return cached[1], cached[2]

    def coming(self, model: Model, capability: Capability) -> bool:
        """Whether a node is being readied for the model (a download under way; for a deployed model,
        a copy being placed or loaded): a request finding no candidate waits for it."""
        return self._ranking(model, capability)[3]

    def _ranking(
        self, model: Model, capability: Capability
    ) -> tuple[tuple[int, int], list[Candidate], str, bool]:
        key = (model.id, capability)
        version = (self._fleet.version, self._deployed.version)
        cached = self._cache.get(key)
        if cached is None or cached[0] != version:
            candidates, why, coming = self._rank(model, capability)
            cached = self._cache[key] = (version, candidates, why, coming)
        return cached

    def serves(self, key: Key, node_id: str) -> bool:
        """Whether ``node_id`` was last ranked for ``key``; True when that key was never ranked."""
        cached = self._cache.get(key)
        return cached is None or any(c.node_id == node_id for c in cached[1])

    def _rank(self, model: Model, capability: Capability) -> tuple[list[Candidate], str, bool]:
        fleet = self._fleet
        deployed = model.id in self._deployed
        candidates: list[Candidate] = []
        downloading: list[ModelOnNode] = []
        failed: list[ModelOnNode] = []
        capable = False
        weights = weight_formats(model)
        others: set[FileFormat] = set()  # what the nodes with the capability run, when none runs these
        for node_id in fleet.online():
            info = fleet.info(node_id)
            if info is None or capability not in info.capabilities:
                continue
            runs = info.runs  # empty: not known (a node seen through another replica), so not judged
            if weights and runs and not weights & runs:
                others.update(runs)
                continue
            capable = True
            state = fleet.state_on(node_id, model.id)
            if deployed and (state is None or not state.pinned):
                continue  # not one of the deployment's copies
            name = state.state if state is not None else ModelState.ABSENT
            if name is ModelState.ABSENT and model.source is ModelSource.LOCAL:
                continue  # placed by hand on some nodes: no origin any other node could fetch it from
            if name is ModelState.DOWNLOADING and state is not None:
                downloading.append(state)
            elif name is ModelState.FAILED and state is not None:
                failed.append(state)
            else:
                slots = state.slots if state is not None and name is ModelState.READY else 0
                candidates.append(Candidate(info.node_id, info.address, _TIER.get(name, DOWNLOADABLE), slots))
        if downloading and not any(c.tier < DOWNLOADABLE for c in candidates):
            # One download is under way; starting another elsewhere would only compete with it.
            candidates = []
        candidates.sort(key=lambda c: c.tier)
        # Nothing to send it to yet, but something on its way: a download, or the copy the scheduler
        # places for a deployment (woken by the request; the queue timeout bounds the wait).
        coming = not candidates and (bool(downloading) or (deployed and capable))
        why = ""
        if not candidates:
            if deployed and capable and not downloading:
                why = f"no copy of model {model.id!r} is ready yet; one is being placed"
            elif downloading:
                best = max(downloading, key=lambda s: s.downloaded_bytes)
                total = best.total_bytes or model.total_bytes
                pct = f"{100 * best.downloaded_bytes / total:.0f}%" if total else "started"
                why = f"model {model.id!r} is downloading on {best.node_id} ({pct}); retry shortly"
            elif failed:
                why = f"model {model.id!r} failed on every capable node: {failed[0].error or 'see node logs'}"
            elif others and not capable:
                names = ", ".join(sorted(f.value for f in weights))
                run = ", ".join(sorted(f.value for f in others.intersection(WEIGHT_FORMATS)))
                why = f"no node can run {names} models (model {model.id!r}); nodes run: {run}"
            else:
                why = f"no online node can serve {capability.value} for model {model.id!r}"
        return candidates, why, coming
