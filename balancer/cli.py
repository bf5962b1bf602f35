"""``llmlb``: run the balancer, and manage its models, nodes and API keys from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import grpc
import grpc.aio
from google.protobuf.json_format import MessageToDict

from common.channels import open_channel
from common.config import (
    BalancerConfig,
    Settings,
    llmlb_home,
    load_balancer_config,
    parse_list,
    parse_listen,
    parse_optional_listen,
)
from common.errors import GRPC_CODE_KEY, ErrorCode, LlmlbError
from common.logs import configure_logging
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import error_from_rpc

if TYPE_CHECKING:
    from google.protobuf.message import Message

    Stub = rgrpc.RegistryAsyncStub

DEFAULT_ADDR = "127.0.0.1:50051"
CALL_TIMEOUT_S = 20.0  # one control-plane call; a balancer that does not answer by then is reported
POLL_INTERVAL_S = 0.5
# A FAILED state reported before this pull is an earlier attempt's: it counts once the node has had
# this long to pick the pull up, or as soon as the node reports anything else first.
STALE_FAILURE_GRACE_S = 10.0

SERVE_ENV_HELP = """\
environment of `llmlb serve` (flags win; $LLMLB_HOME/.env, default ~/.llmlb/.env, is read after it):
  LLMLB_HOME                 where the database, .env and admin-key live (default ~/.llmlb)
  LLMLB_GRPC_LISTEN          host:port the gRPC server binds (default 127.0.0.1:50051)
  LLMLB_HTTP_LISTEN          host:port of the OpenAI HTTP API, /v0 and /metrics (default
                             127.0.0.1:8080; "off" disables it)
  LLMLB_AUTH                 require API keys: on or off (default on); the first start writes an admin
                             key to $LLMLB_HOME/admin-key (mode 0600)
  LLMLB_TLS_CERT / LLMLB_TLS_KEY   certificate and key: the gRPC door speaks TLS when both are set
  LLMLB_TLS_CLIENT_CA        with TLS, callers must present a certificate this CA signed (mTLS)
  LLMLB_DATABASE_URL         SQLAlchemy URL of the metadata store
                             (default sqlite+aiosqlite:///$LLMLB_HOME/llmlb.db; PostgreSQL:
                             postgresql+asyncpg://user:password@host:5432/database)
  LLMLB_DATABASE_POOL_SIZE   PostgreSQL connections kept open (default 5; up to 5 more in a burst)
  LLMLB_CATALOG              path of a supported_models.json to seed from (default: the packaged one)
  LLMLB_ALLOWED_ORIGINS      comma-separated origin URLs models may come from (default: $HF_ENDPOINT)
  LLMLB_ORIGIN_TIMEOUT       seconds per origin request (default 30)
  LLMLB_HEARTBEAT_INTERVAL_MS / LLMLB_HEARTBEAT_TIMEOUT_MS   node session timing (default 1000 / 3000)
  LLMLB_NODE_MAX_INFLIGHT    requests in flight per node before it counts as busy (default 8)
  LLMLB_QUEUE_SIZE           requests that may wait for a free node (default 256; 0: none wait)
  LLMLB_QUEUE_TIMEOUT        seconds a request may wait for a node (default 30)
  LLMLB_REQUEST_TIMEOUT      deadline of a routed request when the caller sets none (default 600)
  LLMLB_ROUTE_ATTEMPTS       distinct nodes a request is tried on before it fails (default 3)
  LLMLB_COOLDOWN_FAILURES    consecutive failures that put a node in cooldown (default 3)
  LLMLB_COOLDOWN             seconds a node stays in cooldown (default 10)
  LLMLB_MAX_BODY_MB          largest HTTP request body, e.g. an audio upload (default 64)
  LLMLB_LOG_FORMAT           console or json (default console)
  LLMLB_LOG_LEVEL            debug, info, warning or error (default info)
  HF_ENDPOINT                Hugging Face endpoint (default https://huggingface.co)
  HF_TOKEN                   token for private or gated repositories
"""

CLIENT_ENV_HELP = """\
environment of the client commands (flags win; $LLMLB_HOME/.env is read after the environment):
  LLMLB_ADDR                 balancer gRPC address (default 127.0.0.1:50051)
  LLMLB_API_KEY              API key to send; unset: the contents of $LLMLB_HOME/admin-key when readable
  LLMLB_HOME                 where admin-key is looked for (default ~/.llmlb)
  LLMLB_TLS_CA               CA certificate of the balancer: set, the CLI dials it with TLS
  LLMLB_TLS_CLIENT_CERT / LLMLB_TLS_CLIENT_KEY   client certificate and key, for mTLS
exit status: 0 on success, 1 when the balancer is unreachable or refuses, 2 on a usage error.
"""

EPILOG = SERVE_ENV_HELP + "\n" + CLIENT_ENV_HELP


# -- arguments ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="llmlb",
        description="llmlb balancer: model catalogue, fleet state, API keys, the gRPC and HTTP doors.",
        epilog=EPILOG,
        formatter_class=raw,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the balancer", epilog=SERVE_ENV_HELP, formatter_class=raw)
    serve.add_argument("--grpc-listen", help="host:port for gRPC (LLMLB_GRPC_LISTEN)")
    serve.add_argument("--http-listen", help='host:port for the HTTP API, or "off" (LLMLB_HTTP_LISTEN)')
    serve.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require API keys; --no-auth lets every call through (LLMLB_AUTH)",
    )
    serve.add_argument("--database-url", help="metadata store URL (LLMLB_DATABASE_URL)")
    serve.add_argument("--catalog", type=Path, help="supported_models.json to seed from (LLMLB_CATALOG)")
    serve.add_argument("--hf-endpoint", help="Hugging Face endpoint (HF_ENDPOINT)")
    serve.add_argument("--allowed-origins", help="comma-separated allowed origins (LLMLB_ALLOWED_ORIGINS)")
    serve.add_argument("--log-format", choices=["console", "json"], help="(LLMLB_LOG_FORMAT)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="(LLMLB_LOG_LEVEL)")
    serve.add_argument("--home", type=Path, help="state directory (LLMLB_HOME)")

    def client(parent: Any, name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(
            name, help=help, description=help, epilog=CLIENT_ENV_HELP, formatter_class=raw
        )
        parser.add_argument("--balancer", help=f"balancer gRPC address (LLMLB_ADDR; default {DEFAULT_ADDR})")
        parser.add_argument("--api-key", help="API key (LLMLB_API_KEY; default: $LLMLB_HOME/admin-key)")
        parser.add_argument("--tls-ca", type=Path, help="CA of the balancer's certificate (LLMLB_TLS_CA)")
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")
        return parser

    models = sub.add_parser("models", help="manage the model catalogue").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    add = client(models, "add", "register a Hugging Face repository, pinned to a commit")
    add.add_argument("repo_id", help="repository id, e.g. org/name")
    add.add_argument("--file", default="", help="one file of the repo (required if it holds several GGUF)")
    add.add_argument("--revision", default="", help="branch, tag or commit (default main)")
    add.add_argument("--id", default="", help="model id to register under (default: derived from repo)")
    add.add_argument("--origin", default="", help="origin base URL (default: HF_ENDPOINT)")
    add.add_argument("--name", default="", help="display name")
    client(models, "list", "list models with their readiness")
    client(models, "show", "one model with its manifest (JSON)").add_argument("model_id")
    client(models, "status", "download / readiness state of a model, per node").add_argument("model_id")
    client(models, "rm", "delete a model; every node deletes its copy").add_argument("model_id")
    pull = client(models, "pull", "tell nodes to fetch and load a model now")
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

    nodes = sub.add_parser("nodes", help="inspect and manage the fleet").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    client(nodes, "list", "list nodes with their state, load and models")
    client(nodes, "drain", "stop sending a node new work; it finishes what is in flight").add_argument(
        "node_id"
    )
    client(nodes, "rm", "forget a node (a running node is drained and disconnected)").add_argument("node_id")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = client(keys, "create", "create an API key; its secret is printed once")
    create.add_argument("--name", required=True, help="a label for people, e.g. chat-frontend")
    create.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        required=True,
        choices=["api", "node", "admin"],
        help="api: inference and reading; node: node workers; admin: everything (repeatable)",
    )
    client(keys, "list", "list keys (never their secrets), revoked ones included")
    client(keys, "revoke", "revoke a key at once").add_argument("key", help="key id or its shown prefix")

    from balancer.demo import add_demo_parser  # the demo's flags live beside the demo

    add_demo_parser(sub)
    return p


# -- talking to the balancer -------------------------------------------------------------------------


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


# -- printing ----------------------------------------------------------------------------------------


def _dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _enum(enum_type: Any, value: int, prefix: str) -> str:
    return str(enum_type.Name(value)).removeprefix(prefix).lower()


def state_name(value: int) -> str:
    """``MODEL_STATE_READY`` -> ``ready``."""
    return _enum(pb.ModelState, value, "MODEL_STATE_")


def _capabilities(values: Sequence[int]) -> str:
    return ",".join(_enum(pb.Capability, v, "CAPABILITY_") for v in values) or "-"


def _scopes(values: Sequence[int]) -> str:
    return ",".join(_enum(pb.Scope, v, "SCOPE_") for v in values)


def _when(message: Any, name: str) -> str:
    if not message.HasField(name):
        return "-"
    return str(getattr(message, name).ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M"))


def human_bytes(n: int) -> str:
    """Bytes the way people read sizes: ``253.1 MB``."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def node_bytes(status: pb.ModelNodeStatus, model_bytes: int) -> tuple[int, int]:
    """(bytes held, bytes needed) of a model on a node; ``model_bytes`` when the node sent no total."""
    total = status.total_bytes or model_bytes
    # Files in place (a shared dir) or fetched: every byte is there even if the node sent no count.
    held = status.state in (pb.MODEL_STATE_PRESENT, pb.MODEL_STATE_LOADING, pb.MODEL_STATE_READY)
    return status.downloaded_bytes or (total if held else 0), total


# -- pull progress -----------------------------------------------------------------------------------


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
    shown: tuple[int, int] | None = None  # (state, tenth of progress) last printed as a plain line

    @property
    def fraction(self) -> float:
        if self.state == pb.MODEL_STATE_READY:
            return 1.0
        return min(1.0, self.downloaded / self.total) if self.total else 0.0

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


@dataclass(slots=True)
class PullProgress:
    """Draws one progress line per (model, node): bars redrawn in place on a TTY, else plain lines."""

    targets: list[_Target]
    out: TextIO
    tty: bool
    drawn: int = 0
    width: dict[str, int] = field(default_factory=dict)

    def _line(self, t: _Target, bar_width: int = 24) -> str:
        filled = round(t.fraction * bar_width)
        bar = "#" * filled + "." * (bar_width - filled)
        size = human_bytes(t.downloaded) + (f" / {human_bytes(t.total)}" if t.total else "")
        label = f"{t.model_id:<{self.width['model']}}  {t.node_id:<{self.width['node']}}"
        return f"{label}  [{bar}] {t.fraction:>4.0%}  {size:<21}  {t.label}"

    def draw(self) -> None:
        if not self.width:
            self.width = {
                "model": max(len(t.model_id) for t in self.targets),
                "node": max(len(t.node_id) for t in self.targets),
            }
        if self.tty:
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F")  # back to the first bar, redrawn in place
            columns = shutil.get_terminal_size().columns - 1  # a wrapped line would break the redraw
            for t in self.targets:
                self.out.write("\x1b[2K" + self._line(t)[:columns] + "\n")
            self.drawn = len(self.targets)
        else:
            for t in self.targets:
                mark = (t.state, int(t.fraction * 10))
                if mark != t.shown:
                    t.shown = mark
                    self.out.write(self._line(t, bar_width=10) + "\n")
        self.out.flush()


async def pull_and_wait(
    stub: Stub,
    model_ids: Sequence[str],
    node_ids: Sequence[str] = (),
    *,
    out: TextIO | None = None,
    timeout_s: float | None = None,
) -> list[rpb.ModelStatus]:
    """Pulls each model onto ``node_ids`` (empty: every able online node) and waits until all are READY.

    Shows progress on ``out`` when given. Raises ``download_failed`` when a told node reports the model
    FAILED, ``timeout`` after ``timeout_s``, and whatever PullModel refuses with.
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
    progress = PullProgress(targets, out, out.isatty()) if out is not None else None
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
            progress.draw()
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


# -- commands ----------------------------------------------------------------------------------------


async def _models(stub: Stub, args: argparse.Namespace) -> int:
    t = CALL_TIMEOUT_S
    if args.action == "add":
        model = await stub.RegisterModel(
            rpb.RegisterModelRequest(
                repo_id=args.repo_id,
                filename=args.file,
                revision=args.revision,
                model_id=args.id,
                origin=args.origin,
                name=args.name,
            ),
            timeout=t,
        )
        if args.json:
            _print_json(_dict(model))
        else:
            files = model.manifest.files
            _table(
                [
                    ["MODEL", "REVISION", "FILES", "SIZE"],
                    [
                        model.id,
                        model.manifest.revision[:12],
                        str(len(files)),
                        human_bytes(sum(f.size_bytes for f in files)),
                    ],
                ]
            )
    elif args.action == "list":
        listed = await stub.ListModels(rpb.ListModelsRequest(), timeout=t)
        if args.json:
            _print_json(_dict(listed))
        else:
            _table(
                [["MODEL", "READY", "NODES", "CAPABILITIES", "REPO", "REVISION"]]
                + [
                    [
                        m.id,
                        "yes" if m.ready else "no",
                        f"{sum(n.ready for n in m.nodes)}/{len(m.nodes)}",
                        _capabilities(m.capabilities),
                        m.repo_id,
                        m.manifest.revision[:12] or "-",
                    ]
                    for m in listed.models
                ]
            )
    elif args.action == "show":
        _print_json(_dict(await stub.GetModel(rpb.GetModelRequest(model_id=args.model_id), timeout=t)))
    elif args.action == "status":
        st = await stub.GetModelStatus(rpb.GetModelStatusRequest(model_id=args.model_id), timeout=t)
        if args.json:
            _print_json(_dict(st))
        else:
            rows = [
                ["MODEL / NODE", "STATE", "PROGRESS", "BYTES", "ERROR"],
                [
                    st.model_id,
                    state_name(st.status),
                    f"{st.progress:.0%}",
                    f"{human_bytes(st.downloaded_bytes)} / {human_bytes(st.total_bytes)}",
                    "",
                ],
            ]
            for n in st.nodes:
                held, needed = node_bytes(n, st.total_bytes)
                rows.append(
                    [
                        f"  {n.node_id}",
                        state_name(n.state),
                        f"{held / needed if needed else 0.0:.0%}",
                        f"{human_bytes(held)} / {human_bytes(needed)}",
                        n.error,
                    ]
                )
            _table(rows)
    elif args.action == "rm":
        done = await stub.DeleteModel(rpb.DeleteModelRequest(model_id=args.model_id), timeout=t)
        if args.json:
            _print_json(_dict(done))
        else:
            print(f"deleted {done.model_id}; {done.nodes_notified} node(s) told to delete their copy")
    elif args.action == "pull":
        return await _pull(stub, args)
    return 0


async def _pull(stub: Stub, args: argparse.Namespace) -> int:
    if not args.wait:
        told = await stub.PullModel(
            rpb.PullModelRequest(model_id=args.model_id, node_ids=args.nodes), timeout=CALL_TIMEOUT_S
        )
        if not told.node_ids:
            raise LlmlbError(ErrorCode.NO_CAPABLE_NODES, f"no online node can fetch {told.model_id}")
        if args.json:
            _print_json(_dict(told))
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
        _print_json(
            {"ready": False, "error": exc.code.value, "message": exc.message, "status": _dict(status)}
        )
        return 1
    if args.json:
        _print_json({"ready": True, "status": _dict(status)})
    else:
        print(f"{status.model_id} is ready")
    return 0


async def _nodes(stub: Stub, args: argparse.Namespace) -> int:
    t = CALL_TIMEOUT_S
    if args.action == "list":
        listed = await stub.ListNodes(rpb.ListNodesRequest(), timeout=t)
        if args.json:
            _print_json(_dict(listed))
            return 0
        rows = [["NODE", "ADDRESS", "STATE", "BACKENDS", "LOAD", "MODELS", "VERSION"]]
        for n in listed.nodes:
            backends = ",".join(_enum(pb.Backend, b, "BACKEND_") for b in n.backends) or "-"
            load = f"{n.load.active_requests}+{n.load.queued_requests}q" if n.HasField("load") else "-"
            models = ",".join(f"{m.model_id}:{state_name(m.state)}" for m in n.models) or "-"
            rows.append(
                [
                    n.id,
                    n.address,
                    _enum(pb.NodeState, n.state, "NODE_STATE_"),
                    backends,
                    load,
                    models,
                    n.version,
                ]
            )
        _table(rows)
    elif args.action == "drain":
        node = await stub.DrainNode(rpb.DrainNodeRequest(node_id=args.node_id), timeout=t)
        if args.json:
            _print_json(_dict(node))
        else:
            print(f"node {node.id} is draining: it finishes what is in flight and gets no new work")
    elif args.action == "rm":
        gone = await stub.RemoveNode(rpb.RemoveNodeRequest(node_id=args.node_id), timeout=t)
        if args.json:
            _print_json(_dict(gone))
        else:
            print(f"removed node {gone.node_id}")
    return 0


async def _keys(stub: Stub, args: argparse.Namespace) -> int:
    t = CALL_TIMEOUT_S
    if args.action == "create":
        scopes = sorted({pb.Scope.Value(f"SCOPE_{s.upper()}") for s in args.scopes})
        made = await stub.CreateKey(rpb.CreateKeyRequest(name=args.name, scopes=scopes), timeout=t)
        if args.json:
            _print_json(_dict(made))
        else:
            key = made.key
            print(f"created key {key.id} ({key.name}, scope {_scopes(key.scopes)})")
            print("its secret, shown this once (only a hash is kept):")
            print(made.secret)
    elif args.action == "list":
        listed = await stub.ListKeys(rpb.ListKeysRequest(), timeout=t)
        if args.json:
            _print_json(_dict(listed))
            return 0
        _table(
            [["KEY", "NAME", "PREFIX", "SCOPES", "CREATED", "LAST USED", "REVOKED"]]
            + [
                [
                    k.id,
                    k.name,
                    k.prefix,
                    _scopes(k.scopes),
                    _when(k, "created_at"),
                    _when(k, "last_used_at"),
                    _when(k, "revoked_at"),
                ]
                for k in listed.keys
            ]
        )
    elif args.action == "revoke":
        key = await stub.RevokeKey(rpb.RevokeKeyRequest(key=args.key), timeout=t)
        if args.json:
            _print_json(_dict(key))
        else:
            print(f"revoked key {key.id} ({key.name}, {key.prefix}...)")
    return 0


async def _run_client(args: argparse.Namespace) -> int:
    settings = client_settings(args.balancer, args.api_key, args.tls_ca)
    async with settings.channel() as channel:
        stub = rgrpc.RegistryStub(channel)
        try:
            if args.command == "models":
                return await _models(stub, args)
            if args.command == "nodes":
                return await _nodes(stub, args)
            return await _keys(stub, args)
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc, settings.address) from None


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_balancer_config(
            grpc_listen=parse_listen(args.grpc_listen) if args.grpc_listen else None,
            http_listen=parse_optional_listen(args.http_listen) if args.http_listen else None,
            auth=args.auth,
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
    except (LlmlbError, OSError, ValueError, RuntimeError) as exc:  # grpc reports a busy port as RuntimeError
        print(f"llmlb: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``llmlb`` entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        from balancer.demo import run_demo

        return run_demo(args)
    try:
        return asyncio.run(_run_client(args))
    except LlmlbError as exc:
        message = " ".join(exc.message.split())  # one line, whatever a node put in its reason
        print(f"error: {exc.code.value}: {message}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an unreadable TLS file
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
