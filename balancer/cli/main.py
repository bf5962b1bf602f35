"""The ``llmlb`` parser and entry point: each command group's flags and work live in its own module."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import grpc

from balancer.cli import config, keys, models, nodes, pull, serve
from balancer.cli.client import CLIENT_ENV_HELP, ClientSettings, client_settings, describe_rpc_error, dial
from common.completion import add_completion
from common.errors import LlmlbError
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.version import VersionAction

EPILOG = serve.SERVE_ENV_HELP + "\n" + CLIENT_ENV_HELP


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmlb",
        description="llmlb balancer: model catalogue, fleet state, API keys, the gRPC and HTTP doors.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=VersionAction)
    add_completion(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(sub)
    config.add_parser(sub)

    def group(name: str, help: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        return sub.add_parser(name, help=help).add_subparsers(dest="action", required=True, metavar="ACTION")

    catalogue = group("models", "manage the model catalogue")
    models.add_parsers(catalogue)
    pull.add_parser(catalogue)
    nodes.add_parsers(group("nodes", "inspect and manage the fleet"))
    keys.add_parsers(group("keys", "manage API keys"))
    return p


async def _run_client(args: argparse.Namespace, settings: ClientSettings) -> int:
    address, channel = await dial(settings)  # of several balancers, the first that answers
    async with channel:
        stub = rgrpc.RegistryStub(channel)
        try:
            code: int = await args.run(stub, args)
            return code
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc, address) from None


def main(argv: Sequence[str] | None = None) -> int:
    """The ``llmlb`` entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve.run(args)
    if args.command == "config":
        return config.run(args)
    try:
        settings = client_settings(args.address, args.api_key, args.tls_ca)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run_client(args, settings))
    except LlmlbError as exc:
        message = " ".join(exc.message.split())  # one line, whatever a node put in its reason
        print(f"error: {exc.code.value}: {message}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an unreadable TLS file
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
