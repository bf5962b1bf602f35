"""What every client command, and anything else that drives the balancer, shares: where to dial, which key
to present, the channel, and the one-line description of a failed call."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from common.channels import open_channel
from common.config import BalancerConfig, Settings, llmlb_home
from common.errors import GRPC_CODE_KEY, ErrorCode, LlmlbError
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.rpc import error_from_rpc

if TYPE_CHECKING:
    Stub = rgrpc.RegistryAsyncStub
    Command = Callable[[Stub, argparse.Namespace], Awaitable[int]]

DEFAULT_ADDR = "127.0.0.1:50051"
CALL_TIMEOUT_S = 20.0  # one control-plane call; a balancer that does not answer by then is reported

CLIENT_ENV_HELP = """\
environment of the client commands (flags win; $LLMLB_HOME/.env is read after the environment):
  LLMLB_ADDR                 balancer gRPC address (default 127.0.0.1:50051)
  LLMLB_API_KEY              API key to send; unset: the contents of $LLMLB_HOME/admin-key when readable
  LLMLB_HOME                 where admin-key is looked for (default ~/.llmlb)
  LLMLB_TLS_CA               CA certificate of the balancer: set, the CLI dials it with TLS
  LLMLB_TLS_CLIENT_CERT / LLMLB_TLS_CLIENT_KEY   client certificate and key, for mTLS
exit status: 0 on success, 1 when the balancer is unreachable or refuses, 2 on a usage error.
"""


def add_client_parser(parent: Any, name: str, help: str, run: Command) -> argparse.ArgumentParser:
    """Adds a client command under ``parent`` with the flags every client command takes.

    ``run`` is what the command does once a Registry stub is dialled; ``main`` calls it.
    """
    parser: argparse.ArgumentParser = parent.add_parser(
        name,
        help=help,
        description=help,
        epilog=CLIENT_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--balancer", help=f"balancer gRPC address (LLMLB_ADDR; default {DEFAULT_ADDR})")
    parser.add_argument("--api-key", help="API key (LLMLB_API_KEY; default: $LLMLB_HOME/admin-key)")
    parser.add_argument("--tls-ca", type=Path, help="CA of the balancer's certificate (LLMLB_TLS_CA)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(run=run)
    return parser


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where the client commands dial and what they present, from flags > environment > .env."""

    address: str
    api_key: str = ""
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def channel(self) -> grpc.aio.Channel:
        return open_channel(
            self.address,
            api_key=self.api_key,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
        )


def read_admin_key(home: Path) -> str:
    """The bootstrap admin key the balancer wrote under ``home``; empty when absent or unreadable."""
    try:
        return BalancerConfig(home=home).admin_key_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def client_settings(
    balancer: str | None = None, api_key: str | None = None, tls_ca: Path | None = None
) -> ClientSettings:
    """Resolves the client side: each argument is a flag and wins over the environment."""
    s = Settings()
    ca = tls_ca or s.get(None, ("LLMLB_TLS_CA",), None, Path)
    return ClientSettings(
        address=balancer or s.raw("LLMLB_ADDR") or DEFAULT_ADDR,
        api_key=api_key or s.raw("LLMLB_API_KEY") or read_admin_key(llmlb_home(s.env)),
        tls_ca=ca,
        tls_cert=s.get(None, ("LLMLB_TLS_CLIENT_CERT",), None, Path) if ca else None,
        tls_key=s.get(None, ("LLMLB_TLS_CLIENT_KEY",), None, Path) if ca else None,
    )


def describe_rpc_error(exc: grpc.RpcError, address: str) -> Exception:
    """The one-line error a person sees for a failed call, with a hint when the fix is on their side.

    ``LlmlbError`` when the balancer answered; ``ConnectionError`` / ``TimeoutError`` when it did not.
    """
    trailing = getattr(exc, "trailing_metadata", None)
    answered = any(key == GRPC_CODE_KEY for key, _ in ((trailing() if callable(trailing) else None) or ()))
    status = exc.code() if hasattr(exc, "code") else None
    if status == grpc.StatusCode.UNAVAILABLE and not answered:
        detail = exc.details() if hasattr(exc, "details") else ""
        return ConnectionError(
            f"cannot reach the balancer at {address} ({detail or 'no answer'}); "
            "is `llmlb serve` running? (--balancer / LLMLB_ADDR)"
        )
    if status == grpc.StatusCode.DEADLINE_EXCEEDED and not answered:
        return TimeoutError(f"the balancer at {address} did not answer within {CALL_TIMEOUT_S:g} s")
    err = error_from_rpc(exc)
    if err.code is ErrorCode.UNAUTHORIZED:
        return LlmlbError(err.code, f"{err.message} (pass --api-key or set LLMLB_API_KEY)")
    return err
