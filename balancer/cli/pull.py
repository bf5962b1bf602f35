"""``llmlb models pull``: tell nodes to fetch and load a model now, and with ``--wait`` follow it."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from balancer.cli.client import CALL_TIMEOUT_S, add_client_parser
from balancer.cli.output import as_dict, print_json
from balancer.cli.progress import pull_and_wait
from common.errors import ErrorCode, LlmlbError
from common.pb.llmlb.v1 import registry_pb2 as rpb

if TYPE_CHECKING:
    from balancer.cli.client import Stub


def add_parser(models: Any) -> None:
    """Adds ``pull`` under ``llmlb models``."""
    pull = add_client_parser(models, "pull", "tell nodes to fetch and load a model now", run)
    pull.add_argument("model_id")
    pull.add_argument(
        "--node",
        dest="nodes",
        action="append",
        default=[],
        metavar="NODE_ID",
        help="a node to tell (repeatable; default: every online node able to serve the model)",
    )
    pull.add_argument(
        "--wait",
        action="store_true",
        help="show progress per node until every told node has it ready (exit 0) or one failed (exit 1)",
    )
    pull.add_argument(
        "--timeout", type=float, default=None, help="with --wait: give up after this many seconds"
    )


async def run(stub: Stub, args: argparse.Namespace) -> int:
    """Tells nodes to pull; 0 once told (``--wait``: once ready), 1 when a node failed or time ran out."""
    if not args.wait:
        told = await stub.PullModel(
            rpb.PullModelRequest(model_id=args.model_id, node_ids=args.nodes), timeout=CALL_TIMEOUT_S
        )
        if not told.node_ids:
            raise LlmlbError(ErrorCode.NO_CAPABLE_NODES, f"no online node can fetch {told.model_id}")
        if args.json:
            print_json(as_dict(told))
        else:
            print(f"told {', '.join(told.node_ids)} to fetch {told.model_id}")
            print(f"follow it with: llmlb models status {told.model_id}")
        return 0
    try:
        [status] = await pull_and_wait(
            stub, [args.model_id], args.nodes, out=None if args.json else sys.stdout, timeout_s=args.timeout
        )
    except LlmlbError as exc:
        if not args.json or exc.code not in (ErrorCode.DOWNLOAD_FAILED, ErrorCode.TIMEOUT):
            raise
        status = await stub.GetModelStatus(
            rpb.GetModelStatusRequest(model_id=args.model_id), timeout=CALL_TIMEOUT_S
        )
        print_json(
            {"ready": False, "error": exc.code.value, "message": exc.message, "status": as_dict(status)}
        )
        return 1
    if args.json:
        print_json({"ready": True, "status": as_dict(status)})
    return 0  # the progress's last line said it is ready
