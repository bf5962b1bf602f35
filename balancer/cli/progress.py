"""Pulling models onto nodes and following them until ready, with a progress bar per (model, node).

``llmlb models pull --wait`` and anything else that must wait for models to be ready (a demo, a script)
share ``pull_and_wait``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from balancer.cli.client import CALL_TIMEOUT_S
from balancer.cli.output import node_bytes, state_name
from common.console_output import TransferProgress, console
from common.errors import ErrorCode, LlmlbError
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb

if TYPE_CHECKING:
    from balancer.cli.client import Stub

POLL_INTERVAL_S = 0.5
# A FAILED state reported before this pull is an earlier attempt's: it counts once the node has had
# this long to pick the pull up, or as soon as the node reports anything else first.
STALE_FAILURE_GRACE_S = 10.0


@dataclass(slots=True)
class _Target:
    """One model on one node the pull told, as last seen."""

    model_id: str
    node_id: str
    baseline: tuple[int, str, int] | None  # (state, error, bytes) reported before the pull
    state: int = pb.MODEL_STATE_UNSPECIFIED
    downloaded: int = 0
    total: int = 0
    error: str = ""
    moved: bool = False  # reported something other than FAILED since the pull

    @property
    def label(self) -> str:
        """The state in words; a node that has not reported the model yet is "waiting"."""
        if self.state == pb.MODEL_STATE_UNSPECIFIED:
            return "waiting"
        if self.state == pb.MODEL_STATE_FAILED and self.error:
            return f"failed: {self.error}"
        return state_name(self.state)

    def update(self, status: pb.ModelNodeStatus | None, model_bytes: int) -> None:
        if status is None:
            return
        self.state, self.error = status.state, status.error
        self.downloaded, self.total = node_bytes(status, model_bytes)
        if self.state != pb.MODEL_STATE_FAILED:
            self.moved = True

    def failed(self, waited_s: float) -> bool:
        if self.state != pb.MODEL_STATE_FAILED:
            return False
        stale = self.baseline == (self.state, self.error, self.downloaded)
        return self.moved or not stale or waited_s > STALE_FAILURE_GRACE_S


async def pull_and_wait(
    stub: Stub,
    model_ids: Sequence[str],
    node_ids: Sequence[str] = (),
    *,
    out: TextIO | None = None,
    timeout_s: float | None = None,
) -> list[rpb.ModelStatus]:
    """Pulls each model onto ``node_ids`` (empty: every able online node) and waits until all are READY.

    Shows progress on ``out`` when given, ending with a line that says what happened. Raises
    ``download_failed`` when a told node reports the model FAILED, ``timeout`` after ``timeout_s``, and
    whatever PullModel refuses with.
    """
    targets: list[_Target] = []
    for model_id in model_ids:
        before = await stub.GetModelStatus(
            rpb.GetModelStatusRequest(model_id=model_id), timeout=CALL_TIMEOUT_S
        )
        seen = {n.node_id: (n.state, n.error, n.downloaded_bytes) for n in before.nodes}
        told = await stub.PullModel(
            rpb.PullModelRequest(model_id=model_id, node_ids=list(node_ids)), timeout=CALL_TIMEOUT_S
        )
        if not told.node_ids:
            raise LlmlbError(ErrorCode.NO_CAPABLE_NODES, f"no online node can fetch {told.model_id}")
        targets += [_Target(told.model_id, node, seen.get(node)) for node in told.node_ids]
    progress = TransferProgress(console(out)) if out is not None else None
    if progress is not None:
        width = max(len(t.model_id) for t in targets)
        for t in targets:
            progress.add((t.model_id, t.node_id), f"{t.model_id:<{width}}  {t.node_id}")
        progress.start()
    try:
        statuses = await _follow(stub, targets, progress, timeout_s)
    except LlmlbError as exc:
        if progress is not None:
            progress.finish(" ".join(exc.message.split()))
        raise
    finally:
        if progress is not None:
            progress.stop()
    if progress is not None:
        ready = list(dict.fromkeys(t.model_id for t in targets))
        progress.finish(f"{', '.join(ready)} {'is' if len(ready) == 1 else 'are'} ready")
    return statuses


async def _follow(
    stub: Stub, targets: list[_Target], progress: TransferProgress | None, timeout_s: float | None
) -> list[rpb.ModelStatus]:
    """Polls the targets' models until every target is READY; raises when one failed or time ran out."""
    started = time.monotonic()
    while True:
        statuses = {
            model_id: await stub.GetModelStatus(
                rpb.GetModelStatusRequest(model_id=model_id), timeout=CALL_TIMEOUT_S
            )
            for model_id in dict.fromkeys(t.model_id for t in targets)
        }
        for t in targets:
            status = statuses[t.model_id]
            t.update(next((n for n in status.nodes if n.node_id == t.node_id), None), status.total_bytes)
            if progress is not None:
                done = t.total if t.state == pb.MODEL_STATE_READY and t.total else t.downloaded
                progress.update((t.model_id, t.node_id), done=done, total=t.total, status=t.label)
        waited = time.monotonic() - started
        failed = [t for t in targets if t.failed(waited)]
        if failed:
            t = failed[0]
            raise LlmlbError(
                ErrorCode.DOWNLOAD_FAILED,
                f"{t.model_id} failed on node {t.node_id}: {t.error or 'no reason given'}",
            )
        if all(t.state == pb.MODEL_STATE_READY for t in targets):
            return list(statuses.values())
        if timeout_s is not None and waited > timeout_s:
            waiting = ", ".join(f"{t.model_id} on {t.node_id} ({t.label})" for t in targets)
            raise LlmlbError(ErrorCode.TIMEOUT, f"not ready after {timeout_s:g} s: {waiting}")
        await asyncio.sleep(POLL_INTERVAL_S)
