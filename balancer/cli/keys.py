"""``llmlb keys create|update|list|revoke``: API keys and their limits."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from balancer.cli.client import CALL_TIMEOUT_S, add_client_parser
from balancer.cli.output import as_dict, print_json, scope_names, when
from common.console_output import print_table
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
    _add_limits(create)
    update = add_client_parser(
        keys, "update", "change a key's limits: those given change, the others stay; 0 clears one", run
    )
    update.add_argument("key", help="key id or its shown prefix")
    _add_limits(update)
    add_client_parser(keys, "list", "list keys (never their secrets), revoked ones included", run)
    add_client_parser(keys, "revoke", "revoke a key at once", run).add_argument(
        "key", help="key id or its shown prefix"
    )


_COUNTS = {
    "rpm": "requests per minute",
    "tpm": "tokens (prompt and completion) per minute",
    "max_parallel": "requests in flight at once (counted by each balancer replica)",
    "daily_tokens": "tokens a day (UTC)",
    "monthly_tokens": "tokens a month (UTC)",
}


def _add_limits(parser: Any) -> None:
    for name, meaning in _COUNTS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, metavar="N", help=f"{meaning}; 0: no limit"
        )
    parser.add_argument(
        "--models",
        default=None,
        metavar="A,B",
        help="the only models the key may use and see, comma-separated; '': every model",
    )


def _limits(args: argparse.Namespace) -> tuple[pb.KeyLimits, list[str]]:
    """The limits the flags give, and the names of those given."""
    given = [name for name in _COUNTS if getattr(args, name) is not None]
    limits = pb.KeyLimits(**{name: getattr(args, name) for name in given})
    if args.models is not None:
        limits.models.extend(m.strip() for m in args.models.split(",") if m.strip())
        given.append("models")
    return limits, given


def limits_text(limits: pb.KeyLimits) -> str:
    """A key's limits in one short line: ``rpm 60, tpm 10000, models a,b``; "-" when none."""
    shown = [f"{name.replace('_', '-')} {getattr(limits, name)}" for name in _COUNTS if getattr(limits, name)]
    if limits.models:
        shown.append("models " + ",".join(limits.models))
    return ", ".join(shown) or "-"


async def run(stub: Stub, args: argparse.Namespace) -> int:
    """Runs one ``llmlb keys`` action against ``stub``; returns the exit status."""
    t = CALL_TIMEOUT_S
    if args.action == "create":
        scopes = sorted({pb.Scope.Value(f"SCOPE_{s.upper()}") for s in args.scopes})
        limits, _ = _limits(args)
        made = await stub.CreateKey(
            rpb.CreateKeyRequest(name=args.name, scopes=scopes, node_id=args.node_id, limits=limits),
            timeout=t,
        )
        if args.json:
            print_json(as_dict(made))
        else:
            key = made.key
            bound = f", node {key.node_id} only" if key.node_id else ""
            print(f"created key {key.id} ({key.name}, scope {scope_names(key.scopes)}{bound})")
            if limits_text(key.limits) != "-":
                print(f"limits: {limits_text(key.limits)}")
            print("its secret, shown this once (only a hash is kept):")
            print(made.secret)
    elif args.action == "update":
        limits, given = _limits(args)
        if not given:
            print("name at least one limit to change, e.g. --rpm 60 (0 clears it)")
            return 2
        key = await stub.UpdateKey(rpb.UpdateKeyRequest(key=args.key, limits=limits, set=given), timeout=t)
        if args.json:
            print_json(as_dict(key))
        else:
            print(f"key {key.id} ({key.name}) limits: {limits_text(key.limits)}")
    elif args.action == "list":
        listed = await stub.ListKeys(rpb.ListKeysRequest(), timeout=t)
        if args.json:
            print_json(as_dict(listed))
            return 0
        print_table(
            [["KEY", "NAME", "PREFIX", "SCOPES", "NODE", "LIMITS", "CREATED", "LAST USED", "REVOKED"]]
            + [
                [
                    k.id,
                    k.name,
                    k.prefix,
                    scope_names(k.scopes),
                    k.node_id or "-",
                    limits_text(k.limits),
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
