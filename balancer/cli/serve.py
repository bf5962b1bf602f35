"""``llmlb serve``: run the balancer."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from common.config import (
    load_balancer_config,
    parse_count,
    parse_list,
    parse_listen,
    parse_optional_listen,
    parse_routing,
)
from common.errors import LlmlbError
from common.logs import configure_logging

SERVE_ENV_HELP = """\
environment of `llmlb serve` (flags win; $LLMLB_HOME/.env, default ~/.llmlb/.env, is read after it):
  LLMLB_HOME                 where the database, .env and admin-key live (default ~/.llmlb)
  LLMLB_GRPC_LISTEN          host:port the gRPC server binds (default 127.0.0.1:50051)
  LLMLB_HTTP_LISTEN          host:port of the OpenAI HTTP API, /v0 and /metrics (default
                             127.0.0.1:8080; "off" disables it)
  LLMLB_BULK_PORT            port of the bulk proxy (HTTP ranges of origin bytes for nodes), on the
                             gRPC host (default 50052; 0: any free port, as when the gRPC port is 0)
  LLMLB_BULK_LISTEN          host:port of the bulk proxy instead, or "off" (default off under TLS)
  LLMLB_AUTH                 require API keys: on or off (default on); the first start writes an admin
                             key to $LLMLB_HOME/admin-key (mode 0600)
  LLMLB_ADMIN_KEY            an admin key's secret to store at start unless stored already ('llmlb-'
                             then 32 or more of A-Z a-z 0-9 - _); set, no admin-key file is written
  LLMLB_UNKNOWN_KEY_CACHE    tokens the store does not hold that are remembered, apart from real keys
                             (default 10000)
  LLMLB_UNKNOWN_KEY_TTL      seconds such a token is answered 401 from memory (default 30)
  LLMLB_UNKNOWN_KEY_RATE     never-seen tokens one client address may have looked up a second;
                             past that, 401 with Retry-After and no store read (default 5)
  LLMLB_TLS_CERT / LLMLB_TLS_KEY   certificate and key: the gRPC door speaks TLS when both are set
  LLMLB_TLS_CLIENT_CA        with TLS, callers must present a certificate this CA signed (mTLS)
  LLMLB_DATABASE_URL         SQLAlchemy URL of the metadata store
                             (default sqlite+aiosqlite:///$LLMLB_HOME/llmlb.db; PostgreSQL:
                             postgresql+asyncpg://user:password@host:5432/database)
  LLMLB_DATABASE_POOL_SIZE   PostgreSQL connections kept open (default 5; up to 5 more in a burst)
  LLMLB_CATALOG              path of a supported_models.json to seed from (default:
                             $LLMLB_HOME/supported_models.json if it exists, else the packaged one)
  LLMLB_ALLOWED_ORIGINS      comma-separated origin URLs models may come from (default: $HF_ENDPOINT)
  LLMLB_ORIGIN_TIMEOUT       seconds per origin request (default 30)
  LLMLB_HEARTBEAT_INTERVAL_MS / LLMLB_HEARTBEAT_TIMEOUT_MS   node session timing (default 1000 / 3000)
  LLMLB_FLEET_TOKEN_TTL      seconds one window of the fleet token lasts (default 3600): nodes renew it
                             over their session; a kept token works at most twice this long, and
                             revoking a node or admin key rotates it at once
  LLMLB_ROUTING              routing policy for chat and completions: cache-aware (default; to the node
                             holding the prompt's prefix, unless it is much busier), power-of-two or
                             round-robin
  LLMLB_NODE_MAX_INFLIGHT    requests in flight per node before it counts as busy, for a node that
                             reports no slots for the model (default 8)
  LLMLB_NODE_QUEUE_ALLOWANCE requests a node gets for a model beyond the slots it reports for it,
                             waiting on the node to refill a finished slot at once (default 1)
  LLMLB_QUEUE_SIZE           requests that may wait for a free node (default 256; 0: none wait)
  LLMLB_QUEUE_TIMEOUT        seconds a request may wait for a node (default 30)
  LLMLB_MAX_QUEUE_WAIT       longest expected wait a request is queued for; longer: 429 at once
                             with Retry-After (default 15)
  LLMLB_REQUEST_TIMEOUT      deadline of a routed request when the caller sets none (default 600)
  LLMLB_ROUTE_ATTEMPTS       distinct nodes a request is tried on before it fails (default 3)
  LLMLB_COOLDOWN_FAILURES    consecutive failures that put a node in cooldown (default 3)
  LLMLB_COOLDOWN             seconds a node stays in cooldown (default 10)
  LLMLB_MAX_BODY_MB          largest HTTP request body, e.g. an audio upload (default 64); the gRPC
                             port takes messages up to this and 1 MiB more
  LLMLB_MAX_HEADER_KB        largest request line and headers on the HTTP and bulk ports; over it:
                             431, then the connection closes (default 64)
  LLMLB_HEADER_TIMEOUT       seconds a request's headers may take to arrive, from the connection or
                             a kept-alive request's first byte; then it closes (default 10)
  LLMLB_KEEPALIVE_TIMEOUT    seconds an idle kept-alive HTTP connection stays open (default 5)
  LLMLB_MAX_CONNECTIONS      open connections per HTTP port; more are closed at once (default 1024)
  LLMLB_LOG_FORMAT           console or json (default console)
  LLMLB_LOG_LEVEL            debug, info, warning or error (default info)
  LLMLB_ACCESS_LOG           on: one "access" log line per request on both doors (method, route,
                             model, key id, status, duration, tokens, node), at level info (default off)
  LLMLB_STOP_GRACE           on SIGTERM, seconds calls in flight may take to finish (default 25)
  LLMLB_USAGE_FLUSH          seconds between batched writes of usage per key and model (default 5)
  LLMLB_KEY_LIMITS_SYNC      seconds between reads of every replica's usage of keys with limits; a
                             replica may overshoot a key's limit by what the others admitted within
                             this long (default 1)
  LLMLB_SCHEDULE_INTERVAL    seconds between the scheduler's passes over the deployments (default 1)
  LLMLB_SCHEDULE_LEASE       seconds the acting scheduler's lease lasts unrenewed; another replica
                             takes over once it lapses (default 5)
  LLMLB_SCALE_UP_QUEUE_WAIT  a min/max deployment gets a copy more when requests waited longer than
                             this many seconds on average (default 2) ...
  LLMLB_SCALE_UP_INFLIGHT    ... or more were in flight per ready copy than its slots: those its node
                             reports for the model, else this many (default 4) ...
  LLMLB_SCALE_UP_WINDOW      ... for this many seconds without a break (default 10)
  LLMLB_SCALE_DOWN_IDLE      seconds with no request after which a min/max deployment has one copy
                             fewer, down to its min (0: none loaded; the next request waits for one)
                             (default 300)
  LLMLB_SCALE_DOWN_WINDOW    seconds the requests in flight must stay under a quarter of one copy
                             fewer's slots before that copy goes (default 300)
  LLMLB_WORKERS              replica processes on this host sharing its ports (default 1;
                             above 1 needs PostgreSQL and fixed ports)
  LLMLB_REPLICA_TIMEOUT_MS   a replica silent this long is taken as dead (default 10000)
  OTEL_EXPORTER_OTLP_ENDPOINT   OpenTelemetry collector (e.g. http://127.0.0.1:4317): set, each request's
                             spans are exported over OTLP (default unset: no traces, no cost); the SDK
                             reads the other OTEL_* variables: OTEL_SERVICE_NAME (default llmlb),
                             OTEL_EXPORTER_OTLP_PROTOCOL (grpc), OTEL_TRACES_SAMPLER, OTEL_BSP_*...
  HF_ENDPOINT                Hugging Face endpoint (default https://huggingface.co)
  HF_TOKEN                   token for private or gated repositories
"""


def add_parser(sub: Any) -> None:
    """Adds ``serve`` and its flags to the ``llmlb`` parser."""
    serve = sub.add_parser(
        "serve",
        help="run the balancer",
        epilog=SERVE_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--grpc-listen", help="host:port for gRPC (LLMLB_GRPC_LISTEN)")
    serve.add_argument("--http-listen", help='host:port for the HTTP API, or "off" (LLMLB_HTTP_LISTEN)')
    serve.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require API keys; --no-auth lets every call through (LLMLB_AUTH)",
    )
    serve.add_argument("--database-url", help="metadata store URL (LLMLB_DATABASE_URL)")
    serve.add_argument(
        "--catalog",
        type=Path,
        help="supported_models.json to seed from (LLMLB_CATALOG; default: $LLMLB_HOME/supported_models.json "
        "if it exists, else the packaged one)",
    )
    serve.add_argument("--hf-endpoint", help="Hugging Face endpoint (HF_ENDPOINT)")
    serve.add_argument("--allowed-origins", help="comma-separated allowed origins (LLMLB_ALLOWED_ORIGINS)")
    serve.add_argument("--log-format", choices=["console", "json"], help="(LLMLB_LOG_FORMAT)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="(LLMLB_LOG_LEVEL)")
    serve.add_argument(
        "--routing",
        help="routing policy: cache-aware, power-of-two or round-robin (LLMLB_ROUTING)",
    )
    serve.add_argument("--home", type=Path, help="state directory (LLMLB_HOME)")
    serve.add_argument(
        "--workers",
        type=int,
        help="replica processes on this host sharing its ports; PostgreSQL only (LLMLB_WORKERS)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs the balancer until it is stopped; 2 on a configuration error, 1 when it cannot serve."""
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
            workers=parse_count(str(args.workers)) if args.workers is not None else None,
            routing=parse_routing(args.routing) if args.routing else None,
            home=args.home,
        )
        if config.workers > 1 and not config.shared_ports:
            from balancer.workers import check_workers  # imported late so client commands start fast

            check_workers(config)
    except ValueError as exc:
        print(f"llmlb: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    # The balancer talks to the origins it is told to and nowhere else: no hub telemetry.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if config.workers > 1 and not config.shared_ports:  # the supervisor of the workers
        from balancer.workers import supervise

        try:
            return supervise(config, sys.argv[1:])
        except (LlmlbError, OSError, ValueError, RuntimeError) as exc:
            print(f"llmlb: {exc}", file=sys.stderr)
            return 1
    from balancer.server import serve  # imported late so client commands start fast

    try:
        asyncio.run(serve(config))
    except (LlmlbError, OSError, ValueError, RuntimeError) as exc:  # grpc reports a busy port as RuntimeError
        print(f"llmlb: {exc}", file=sys.stderr)
        return 1
    return 0
