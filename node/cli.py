"""``xllm``: the node worker's command line.

Serving inference arrives with the node worker; today the CLI resolves and shows the node's
configuration, so operators can check where model files will live.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from common.config import llmlb_home, resolve_models_dir

ENV_HELP = """\
environment (flags win over these; ~/.llmlb/.env or $LLMLB_HOME/.env is read after the environment):
  XLLM_MODELS_DIR   where the node keeps model files (then LLM_MODELS_DIR, then ~/.llmlb/models)
  LLM_MODELS_DIR    older name of XLLM_MODELS_DIR, still honoured
  LLMLB_HOME        state directory (default ~/.llmlb)
"""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="xllm",
        description="llmlb node worker.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    cfg = sub.add_parser("config", help="show the resolved node configuration")
    cfg.add_argument("--models-dir", type=Path, help="model files directory (XLLM_MODELS_DIR)")
    cfg.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    resolved = {"home": str(llmlb_home()), "models_dir": str(resolve_models_dir(args.models_dir))}
    if args.json:
        print(json.dumps(resolved, indent=2))
    else:
        for key, value in resolved.items():
            print(f"{key:12} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
