"""What every client command, and anything else that drives the balancer, shares: where to dial, which key
to present, the channel, and the one-line description of a failed call."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.channels import open_channel
from common.config import BalancerConfig, ClientSchema, llmlb_home, parse_balancers
from common.errors import ErrorCode, LlmlbError
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.rpc import answered, error_from_rpc
from common.settings import Layers, add_flags, env_help, flagged, load

if TYPE_CHECKING:
    Stub = rgrpc.RegistryAsyncStub
    Command = Callable[[Stub, argparse.Namespace], Awaitable[int]]

CALL_TIMEOUT_S = 20.0  # one control-plane call; a balancer that does not answer by then is reported
PROBE_TIMEOUT_S = 5.0  # with several addresses, how long one may take to answer its health check

CLIENT_ENV_HELP = (
    env_help(ClientSchema, "environment of the client commands (flags win; $LLMLB_HOME/.env is read next):")
    + "exit status: 0 on success, 1 when the balancer is unreachable or refuses, 2 on a usage error.\n"
)


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
    add_flags(parser, ClientSchema, flagged(ClientSchema), None)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(run=run)
    return parser


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where the client commands dial and what they present, from flags > environment > .env."""

    address: str  # one address, or several joined by commas, tried in order
    api_key: str = ""
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def addresses(self) -> tuple[str, ...]:
        return parse_balancers(self.address)

    def channel(self, address: str | None = None) -> grpc.aio.Channel:
        """A channel to ``address`` (default: the first one) with the key and TLS settings."""
        return open_channel(
            address or self.addresses[0],
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
    balancer: str | None = None,
    api_key: str | None = None,
    tls_ca: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ClientSettings:
    """Resolves the client side: each argument is a flag and wins over the environment."""
    values = load_client_settings(balancer, api_key, tls_ca, env)
    home = llmlb_home(env)  # the environment's: the .env file lives under it
    key = values.api_key.reveal() if values.api_key else ""
    return ClientSettings(
        address=values.address,
        api_key=key or read_admin_key(home),  # the balancer's own admin key, on its host
        tls_ca=values.tls_ca,
        tls_cert=values.tls_cert if values.tls_ca else None,
        tls_key=values.tls_key if values.tls_ca else None,
    )


def load_client_settings(
    balancer: str | None = None,
    api_key: str | None = None,
    tls_ca: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ClientSchema:
    """The client's settings as the schema checks them; a bad value is a usage error, before any call."""
    home = llmlb_home(env)
    flags = {"address": balancer or None, "api_key": api_key or None, "tls_ca": tls_ca}
    return load(ClientSchema, Layers.read(env, home / ".env"), flags)


def describe_rpc_error(exc: grpc.RpcError, address: str) -> Exception:
    """The one-line error a person sees for a failed call, with a hint when the fix is on their side.

    ``LlmlbError`` when the balancer answered; ``ConnectionError`` / ``TimeoutError`` when it did not.
    """
    replied = answered(exc)
    status = exc.code() if hasattr(exc, "code") else None
    if status == grpc.StatusCode.UNAVAILABLE and not replied:
        detail = exc.details() if hasattr(exc, "details") else ""
        return ConnectionError(
            f"cannot reach the balancer at {address} ({detail or 'no answer'}); "
            "is `llmlb serve` running? (--balancer / LLMLB_ADDR)"
        )
    if status == grpc.StatusCode.DEADLINE_EXCEEDED and not replied:
        return TimeoutError(f"the balancer at {address} did not answer within {CALL_TIMEOUT_S:g} s")
    err = error_from_rpc(exc)
    if err.code is ErrorCode.UNAUTHORIZED:
        return LlmlbError(err.code, f"{err.message} (pass --api-key or set LLMLB_API_KEY)")
    return err


async def dial(settings: ClientSettings) -> tuple[str, grpc.aio.Channel]:
    """The first balancer that answers its health check, in the order given, and a channel to it.

    One address is dialled without a check, as always: its first call reports what is wrong. Of several,
    one that refuses the connection, times out or is not serving is passed over for the next; when none
    answers, the error names every address tried.
    """
    addresses = settings.addresses
    if len(addresses) == 1:
        return addresses[0], settings.channel(addresses[0])
    failures: list[str] = []
    for address in addresses:
        channel = settings.channel(address)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            failures.append(f"{address}: {exc.details() or exc.code().name.lower()}")
        else:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return address, channel
            failures.append(f"{address}: not serving")
        await channel.close(None)
    tried = "; ".join(failures)
    raise ConnectionError(
        f"cannot reach any balancer ({tried}); is `llmlb serve` running? (--balancer / LLMLB_ADDR)"
    )
