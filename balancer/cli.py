"""``llmlb``: run the balancer and manage its catalogue from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from common.config import load_balancer_config, parse_list
from common.errors import LlmlbError
from common.logs import configure_logging
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.rpc import CHANNEL_OPTIONS, error_from_rpc

ENV_HELP = """\
environment (flags win over these; ~/.llmlb/.env or $LLMLB_HOME/.env is read after the environment):
  LLMLB_HOME                 where the database, .env and keys live (default ~/.llmlb)
  LLMLB_GRPC_LISTEN          host:port the balancer's gRPC server binds (default 127.0.0.1:50051)
  LLMLB_DATABASE_URL         SQLAlchemy URL of the metadata store (default sqlite+aiosqlite:///$LLMLB_HOME/llmlb.db)
  LLMLB_CATALOG              path of a supported_models.json to seed from (default: the packaged one)
  LLMLB_ALLOWED_ORIGINS      comma-separated origin URLs models may come from (default: $HF_ENDPOINT)
  LLMLB_ORIGIN_TIMEOUT       seconds per origin request (default 30)
  LLMLB_HEARTBEAT_INTERVAL_MS / LLMLB_HEARTBEAT_TIMEOUT_MS   node session timing (default 1000 / 3000)
  LLMLB_LOG_FORMAT           console or json (default console)
  LLMLB_LOG_LEVEL            debug, info, warning or error (default info)
  LLMLB_ADDR                 balancer address the client commands call (default 127.0.0.1:50051)
  HF_ENDPOINT                Hugging Face endpoint (default https://huggingface.co)
  HF_TOKEN                   token for private or gated repositories
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmlb",
        description="llmlb balancer: model catalogue, fleet state and the gRPC front door.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the balancer",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--grpc-listen", help="host:port for gRPC (LLMLB_GRPC_LISTEN)")
    serve.add_argument("--database-url", help="metadata store URL (LLMLB_DATABASE_URL)")
    serve.add_argument("--catalog", type=Path, help="supported_models.json to seed from (LLMLB_CATALOG)")
    serve.add_argument("--hf-endpoint", help="Hugging Face endpoint (HF_ENDPOINT)")
    serve.add_argument("--allowed-origins", help="comma-separated allowed origins (LLMLB_ALLOWED_ORIGINS)")
    serve.add_argument("--log-format", choices=["console", "json"], help="(LLMLB_LOG_FORMAT)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="(LLMLB_LOG_LEVEL)")
    serve.add_argument("--home", type=Path, help="state directory (LLMLB_HOME)")

    def client(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--balancer", default=None, help="balancer gRPC address (LLMLB_ADDR)")
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")
        return parser

    models = sub.add_parser("models", help="manage the model catalogue").add_subparsers(
        dest="action", required=True
    )
    add = client(models.add_parser("add", help="register a Hugging Face repository, pinned to a commit"))
    add.add_argument("repo_id", help="repository id, e.g. org/name")
    add.add_argument("--file", default="", help="one file of the repo (required if it holds several GGUF)")
    add.add_argument("--revision", default="", help="branch, tag or commit (default main)")
    add.add_argument("--id", default="", help="model id to register under (default: derived from repo)")
    add.add_argument("--origin", default="", help="origin base URL (default: HF_ENDPOINT)")
    add.add_argument("--name", default="", help="display name")
    client(models.add_parser("list", help="list models"))
    show = client(models.add_parser("show", help="one model with its manifest"))
    show.add_argument("model_id")
    status = client(models.add_parser("status", help="download / readiness state of a model"))
    status.add_argument("model_id")
    rm = client(models.add_parser("rm", help="delete a model; every node deletes its copy"))
    rm.add_argument("model_id")

    nodes = sub.add_parser("nodes", help="inspect the fleet").add_subparsers(dest="action", required=True)
    client(nodes.add_parser("list", help="list nodes"))
    return p


def _print(message: Any, as_json: bool, table: list[list[str]] | None = None) -> None:
    if as_json or table is None:
        print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))
        return
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _run_client(args: argparse.Namespace) -> int:
    address = args.balancer or os.environ.get("LLMLB_ADDR") or "127.0.0.1:50051"
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = rgrpc.RegistryStub(channel)
        try:
            return _dispatch(stub, args)
        except grpc.RpcError as exc:
            err = error_from_rpc(exc)
            print(f"error: {err.code.value}: {err.message}", file=sys.stderr)
            return 1


def _dispatch(stub: rgrpc.RegistryStub, args: argparse.Namespace) -> int:
    if args.command == "nodes":
        nodes = stub.ListNodes(rpb.ListNodesRequest()).nodes
        rows = [["NODE", "ADDRESS", "STATE", "BACKENDS", "VERSION"]] + [
            [n.id, n.address, _enum_name(n, "state"), ",".join(_enum_names(n, "backends")), n.version]
            for n in nodes
        ]
        _print(rpb.ListNodesResponse(nodes=nodes), args.json, rows)
        return 0
    if args.action == "add":
        model = stub.RegisterModel(
            rpb.RegisterModelRequest(
                repo_id=args.repo_id,
                filename=args.file,
                revision=args.revision,
                model_id=args.id,
                origin=args.origin,
                name=args.name,
            )
        )
        _print(
            model,
            args.json,
            [
                ["MODEL", "REVISION", "FILES", "BYTES"],
                [
                    model.id,
                    model.manifest.revision[:12],
                    str(len(model.manifest.files)),
                    str(sum(f.size_bytes for f in model.manifest.files)),
                ],
            ],
        )
        return 0
    if args.action == "list":
        response = stub.ListModels(rpb.ListModelsRequest())
        rows = [["MODEL", "READY", "CAPABILITIES", "REPO", "REVISION"]] + [
            [
                m.id,
                "yes" if m.ready else "no",
                ",".join(_enum_names(m, "capabilities")),
                m.repo_id,
                m.manifest.revision[:12] or "-",
            ]
            for m in response.models
        ]
        _print(response, args.json, rows)
        return 0
    if args.action == "show":
        _print(stub.GetModel(rpb.GetModelRequest(model_id=args.model_id)), True)
        return 0
    if args.action == "status":
        st = stub.GetModelStatus(rpb.GetModelStatusRequest(model_id=args.model_id))
        _print(
            st,
            args.json,
            [
                ["MODEL", "STATUS", "PROGRESS", "BYTES"],
                [
                    st.model_id,
                    _enum_name(st, "status"),
                    f"{st.progress:.0%}",
                    f"{st.downloaded_bytes}/{st.total_bytes}",
                ],
            ],
        )
        return 0
    if args.action == "rm":
        done = stub.DeleteModel(rpb.DeleteModelRequest(model_id=args.model_id))
        _print(done, args.json, [[f"deleted {done.model_id}; {done.nodes_notified} node(s) told"]])
        return 0
    raise AssertionError(args.action)


def _enum_name(msg: Any, field: str) -> str:
    fd = msg.DESCRIPTOR.fields_by_name[field]
    name: str = fd.enum_type.values_by_number[getattr(msg, field)].name
    return name.split("_", 2)[-1].lower()


def _enum_names(msg: Any, field: str) -> list[str]:
    fd = msg.DESCRIPTOR.fields_by_name[field]
    return [fd.enum_type.values_by_number[v].name.split("_", 1)[-1].lower() for v in getattr(msg, field)]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "serve":
        return _run_client(args)
    try:
        config = load_balancer_config(
            grpc_listen=args.grpc_listen,
            database_url=args.database_url,
            catalog_path=args.catalog,
            hf_endpoint=args.hf_endpoint,
            allowed_origins=parse_list(args.allowed_origins) if args.allowed_origins else None,
            log_format=args.log_format,
            log_level=args.log_level,
            home=args.home,
        )
    except ValueError as exc:
        print(f"llmlb: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    # The balancer talks to the origins it is told to and nowhere else: no hub telemetry.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from balancer.server import serve  # imported late so client commands start fast

    try:
        asyncio.run(serve(config))
    except (LlmlbError, OSError, ValueError) as exc:
        print(f"llmlb: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
