"""``llmlb keys create|list|revoke``: API keys."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from balancer.cli.client import CALL_TIMEOUT_S, add_client_parser
from balancer.cli.output import as_dict, print_json, print_table, scope_names, when
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb

if TYPE_CHECKING:
    from balancer.cli.client import Stub


def add_parsers(keys: Any) -> None:
    """Adds the key actions under ``llmlb keys``."""
    create = add_client_parser(keys, "create", "create an API key; its secret is printed once", run)
    create.add_argument("--name", required=True, help="a label for people, e.g. chat-frontend")
    create.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        required=True,
        choices=["api", "node", "admin"],
        help="api: inference and reading; node: node workers; admin: everything (repeatable)",
    )
    create.add_argument(
        "--node-id",
        default="",
        help="bind a node key to this node id: it may register that id only (and take it over from "
        "the key that held it)",
    )
    add_client_parser(keys, "list", "list keys (never their secrets), revoked ones included", run)
    add_client_parser(keys, "revoke", "revoke a key at once", run).add_argument(
        "key", help="key id or its shown prefix"
    )


async def run(stub: Stub, args: argparse.Namespace) -> int:
    """Runs one ``llmlb keys`` action against ``stub``; returns the exit status."""
    t = CALL_TIMEOUT_S
    if args.action == "create":
        scopes = sorted({pb.Scope.Value(f"SCOPE_{s.upper()}") for s in args.scopes})
        made = await stub.CreateKey(
            rpb.CreateKeyRequest(name=args.name, scopes=scopes, node_id=args.node_id), timeout=t
        )
        if args.json:
            print_json(as_dict(made))
        else:
            key = made.key
            bound = f", node {key.node_id} only" if key.node_id else ""
            print(f"created key {key.id} ({key.name}, scope {scope_names(key.scopes)}{bound})")
            print("its secret, shown this once (only a hash is kept):")
            print(made.secret)
    elif args.action == "list":
        listed = await stub.ListKeys(rpb.ListKeysRequest(), timeout=t)
        if args.json:
            print_json(as_dict(listed))
            return 0
        print_table(
            [["KEY", "NAME", "PREFIX", "SCOPES", "NODE", "CREATED", "LAST USED", "REVOKED"]]
            + [
                [
                    k.id,
                    k.name,
                    k.prefix,
                    scope_names(k.scopes),
                    k.node_id or "-",
                    when(k, "created_at"),
                    when(k, "last_used_at"),
                    when(k, "revoked_at"),
                ]
                for k in listed.keys
            ]
        )
    elif args.action == "revoke":
        key = await stub.RevokeKey(rpb.RevokeKeyRequest(key=args.key), timeout=t)
        if args.json:
            print_json(as_dict(key))
        else:
            print(f"revoked key {key.id} ({key.name}, {key.prefix}...)")
    return 0
