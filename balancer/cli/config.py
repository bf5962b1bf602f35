"""``llmlb config``: the balancer's settings as ``llmlb serve`` would resolve them, secrets masked."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from balancer.cli import serve
from common.config import BalancerConfig
from common.settings import shown


def add_parser(sub: Any) -> None:
    """Adds ``config``: the serve flags (so their effect can be seen) and ``--json``."""
    parser = sub.add_parser(
        "config",
        help="show the resolved balancer configuration",
        epilog=serve.SERVE_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_serve_flags(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def view(config: BalancerConfig) -> dict[str, Any]:
    """Each setting's resolved value, JSON-ready; secrets show as "set", a database password masked."""
    out: dict[str, Any] = {}
    for name in config.__dataclass_fields__:
        value = getattr(config, name)
        if name == "otel":  # headers may carry the collector's credential
            value = {k: "set" if "HEADERS" in k else v for k, v in value}
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        out[name] = shown(value)
    return out


def run(args: argparse.Namespace) -> int:
    """Prints the configuration; 2 on a bad value, as ``llmlb serve`` would stop."""
    try:
        config = serve.load_config(args)
    except ValueError as exc:
        print(f"llmlb: configuration error: {exc}", file=sys.stderr)
        return 2
    shown_config = view(config)
    if args.json:
        print(json.dumps(shown_config, indent=2))
    else:
        for key, value in shown_config.items():
            print(f"{key:26} {value}")
    return 0
