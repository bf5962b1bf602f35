"""``llmlb nodes list|drain|undrain|rm``: the fleet."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from balancer.cli.client import CALL_TIMEOUT_S, add_client_parser
from balancer.cli.output import as_dict, enum_name, print_json, state_name
from common.console_output import print_table
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb

if TYPE_CHECKING:
    from balancer.cli.client import Stub


def add_parsers(nodes: Any) -> None:
    """Adds the fleet actions under ``llmlb nodes``."""
    add_client_parser(nodes, "list", "list nodes with their state, load and models", run)
    add_client_parser(
        nodes, "drain", "stop sending a node new work; it finishes what is in flight", run
    ).add_argument("node_id")
    add_client_parser(
        nodes, "undrain", "put a drained node back in rotation: it takes new work again", run
    ).add_argument("node_id")
    add_client_parser(
        nodes, "rm", "forget a node (a running node is drained and disconnected)", run
    ).add_argument("node_id")


async def run(stub: Stub, args: argparse.Namespace) -> int:
    """Runs one ``llmlb nodes`` action against ``stub``; returns the exit status."""
    t = CALL_TIMEOUT_S
    if args.action == "list":
        listed = await stub.ListNodes(rpb.ListNodesRequest(), timeout=t)
        if args.json:
            print_json(as_dict(listed))
            return 0
        rows = [["NODE", "ADDRESS", "STATE", "BACKENDS", "LOAD", "MODELS", "VERSION", "REPLICA"]]
        for n in listed.nodes:
            backends = ",".join(enum_name(pb.Backend, b, "BACKEND_") for b in n.backends) or "-"
            load = f"{n.load.active_requests}+{n.load.queued_requests}q" if n.HasField("load") else "-"
            models = ",".join(f"{m.model_id}:{state_name(m.state)}" for m in n.models) or "-"
            rows.append(
                [
                    n.id,
                    n.address,
                    enum_name(pb.NodeState, n.state, "NODE_STATE_"),
                    backends,
                    load,
                    models,
                    n.version,
                    n.replica or "-",
                ]
            )
        print_table(rows, status_columns=["STATE"])
    elif args.action == "drain":
        node = await stub.DrainNode(rpb.DrainNodeRequest(node_id=args.node_id), timeout=t)
        if args.json:
            print_json(as_dict(node))
        else:
            print(f"node {node.id} is draining: it finishes what is in flight and gets no new work")
    elif args.action == "undrain":
        node = await stub.UndrainNode(rpb.UndrainNodeRequest(node_id=args.node_id), timeout=t)
        if args.json:
            print_json(as_dict(node))
        else:
            print(f"node {node.id} takes new work again")
    elif args.action == "rm":
        gone = await stub.RemoveNode(rpb.RemoveNodeRequest(node_id=args.node_id), timeout=t)
        if args.json:
            print_json(as_dict(gone))
        else:
            print(f"removed node {gone.node_id}")
    return 0
