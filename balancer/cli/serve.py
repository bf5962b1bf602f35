"""``llmlb serve``: run the balancer."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from common.config import BalancerConfig, BalancerSchema, load_balancer_config
from common.errors import LlmlbError
from common.logs import configure_logging
from common.settings import add_flags, env_help, flagged

OTEL_HELP = """\
  OTEL_EXPORTER_OTLP_ENDPOINT  OpenTelemetry collector (e.g. http://127.0.0.1:4317): set, each request's
                               spans are exported over OTLP (default unset: no traces, no cost); the SDK
                               reads the other OTEL_* variables: OTEL_SERVICE_NAME (default llmlb),
                               OTEL_EXPORTER_OTLP_PROTOCOL (grpc), OTEL_TRACES_SAMPLER, OTEL_BSP_*...
"""

SERVE_ENV_HELP = (
    env_help(
        BalancerSchema,
        "environment of `llmlb serve` (flags win; $LLMLB_HOME/.env, default ~/.llmlb/.env, is read next):",
    )
    + OTEL_HELP
)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``llmlb serve`` (``llmlb config`` takes them too), each from the schema."""
    add_flags(parser, BalancerSchema, flagged(BalancerSchema), None)


def add_parser(sub: Any) -> None:
    """Adds ``serve`` and its flags to the ``llmlb`` parser."""
    serve = sub.add_parser(
        "serve",
        help="run the balancer",
        epilog=SERVE_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_flags(serve)


def load_config(args: argparse.Namespace) -> BalancerConfig:
    """The balancer's config from the serve flags in ``args`` over the environment; ValueError when bad."""
    return load_balancer_config(
        **{name: getattr(args, name, None) for name in flagged(BalancerSchema) if name != "home"},
        home=Path(args.home) if getattr(args, "home", None) else None,
    )


def run(args: argparse.Namespace) -> int:
    """Runs the balancer until it is stopped; 2 on a configuration error, 1 when it cannot serve."""
    try:
        config = load_config(args)
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
