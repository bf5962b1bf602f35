"""``xllm``: the node worker's command line: serve, show the configuration, list local models."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common.completion import add_completion
from common.config import NodeConfig, NodeSchema, load_node_config
from common.console_output import TransferProgress, console, print_table
from common.logs import configure_logging
from common.settings import add_flags, env_help, flagged
from common.version import VersionAction

OTEL_HELP = """\
  OTEL_EXPORTER_OTLP_ENDPOINT  OpenTelemetry collector: set, each call's spans (under the balancer's,
                               from its traceparent) are exported over OTLP (default unset: no traces);
                               OTEL_SERVICE_NAME defaults to xllm; the SDK reads the other OTEL_*
"""

ENV_HELP = (
    env_help(
        NodeSchema,
        "environment (flags win over these; $LLMLB_HOME/.env, default ~/.llmlb/.env, is read after the "
        "environment):",
    )
    + OTEL_HELP
)

# Where the node keeps and finds models and which balancer it uses: every command takes these.
NODE_FLAGS = ("models_dir", "shared_dir", "balancer", "home")
# How the node serves: ``xllm serve`` takes these, and so does ``xllm`` alone (it serves).
SERVE_FLAGS = tuple(name for name in flagged(NodeSchema) if name not in NODE_FLAGS)


def _node_flags(parser: argparse.ArgumentParser, default: Any) -> argparse.ArgumentParser:
    add_flags(parser, NodeSchema, NODE_FLAGS, default)
    return parser


def _serve_flags(parser: argparse.ArgumentParser, default: Any) -> argparse.ArgumentParser:
    add_flags(parser, NodeSchema, SERVE_FLAGS, default)
    return parser


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xllm",
        usage="xllm [options] [{serve,config,pull,models} ...]",
        description="llmlb node worker: finds model files, serves them to peers, obeys the balancer. "
        "With no command it serves; options before the command apply to it.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=VersionAction)
    add_completion(p)
    # The top level holds every node option (None when absent); a command's own copy of an option
    # is SUPPRESSed when absent, so ``xllm --models-dir D serve`` keeps D instead of resetting it.
    _serve_flags(_node_flags(p, None), None)
    sub = p.add_subparsers(dest="command", metavar="{serve,config,pull,models}")
    keep = argparse.SUPPRESS

    _serve_flags(
        _node_flags(
            sub.add_parser(
                "serve",
                help="run the node (the default)",
                epilog=ENV_HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            ),
            keep,
        ),
        keep,
    )

    cfg = _node_flags(sub.add_parser("config", help="show the resolved node configuration"), keep)
    cfg.add_argument("--json", action="store_true", help="print JSON")

    pull = _node_flags(
        sub.add_parser("pull", help="fetch models into the models dir now (asks the balancer for manifests)"),
        keep,
    )
    pull.add_argument("model_ids", nargs="+", metavar="MODEL_ID")
    add_flags(pull, NodeSchema, ("download_via", "backend"), keep)
    pull.add_argument("--json", action="store_true", help="print JSON")

    models = _node_flags(sub.add_parser("models", help="list the models this node's models dir holds"), keep)
    models.add_argument("--json", action="store_true", help="print JSON")
    return p


def _config(args: argparse.Namespace) -> NodeConfig:
    flags = {name: getattr(args, name, None) for name in flagged(NodeSchema) if name != "home"}
    return load_node_config(**flags, home=Path(args.home) if args.home else None)


def _show_config(config: NodeConfig) -> dict[str, Any]:
    shown: dict[str, Any] = {}
    for name in config.__dataclass_fields__:
        value = getattr(config, name)
        if name == "hf_token":
            value = "set" if value else None  # never print a secret
        elif name in ("auth_token", "api_key"):
            value = "set" if value else ""
        elif name == "otel":  # headers may carry the collector's credential
            value = {k: "set" if "HEADERS" in k else v for k, v in value}
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        shown[name] = value
    return shown


def _list_models(config: NodeConfig) -> list[dict[str, Any]]:
    from node.storage import Storage

    with ThreadPoolExecutor(max_workers=1) as io_threads:
        storage = Storage(config.models_dir, io_threads)
        rows = []
        for model in storage.known_models():
            partial = sum(storage.partial_bytes(model.id, f.filename) for f in model.files)
            rows.append(
                {
                    "model_id": model.id,
                    "repo": model.repo_id,
                    "revision": model.revision,
                    "total_bytes": model.total_bytes,
                    "partial_bytes": partial,
                    "path": str(storage.model_dir(model.id)),
                }
            )
        return rows


async def _pull(
    config: NodeConfig, model_ids: list[str], progress: TransferProgress | None = None
) -> list[dict[str, Any]]:
    from common.errors import LlmlbError
    from node.downloader import Progress
    from node.process import assemble

    parts = assemble(config, address="")
    if progress is not None:
        tell_resolver = parts.downloader.on_progress

        def on_progress(p: Progress) -> None:  # each file's bytes: the resolver's count, and a bar
            tell_resolver(p)
            key = (p.model_id, p.filename)
            progress.add(key, f"{p.model_id}  {p.filename}", total=p.total)
            done = p.total and p.done >= p.total
            progress.update(key, done=p.done, total=p.total, status="fetched" if done else "downloading")

        parts.downloader.on_progress = on_progress
    results: list[dict[str, Any]] = []
    try:
        for model_id in model_ids:
            try:
                resolved = await parts.resolver.resolve(model_id)
            except LlmlbError as exc:
                results.append({"model_id": model_id, "error": exc.code.value, "message": exc.message})
                continue
            results.append(
                {
                    "model_id": resolved.model.id,
                    "files": {
                        name: {"path": str(path), "from": resolved.sources.get(name, "")}
                        for name, path in resolved.paths.items()
                    },
                }
            )
    finally:
        await parts.close()
    return results


def _pull_command(config: NodeConfig, model_ids: list[str], *, as_json: bool) -> int:
    """``xllm pull``: a bar per file while it downloads, the files' places, then a line saying what
    happened; 1 when a model could not be fetched."""
    if as_json:
        results = asyncio.run(_pull(config, model_ids))
        print(json.dumps(results, indent=2))
        return 1 if any("error" in r for r in results) else 0
    progress = TransferProgress(console())
    with progress:
        results = asyncio.run(_pull(config, model_ids, progress))
    rows = [["MODEL", "FILE", "FROM", "PATH"]]
    for r in results:
        if "error" in r:
            print(f"{r['model_id']}: error: {r['error']}: {r['message']}", file=sys.stderr)
        else:
            rows += [[r["model_id"], name, f["from"], f["path"]] for name, f in r["files"].items()]
    if len(rows) > 1:
        print_table(rows)
    progress.finish(pull_outcome(results))
    return 1 if any("error" in r for r in results) else 0


def pull_outcome(results: list[dict[str, Any]]) -> str:
    """The last line of ``xllm pull``: ``a and b are ready`` or ``a is ready; c failed (model_not_found)``."""
    ready = [r["model_id"] for r in results if "error" not in r]
    failed = [f"{r['model_id']} failed ({r['error']})" for r in results if "error" in r]
    said = [f"{', '.join(ready)} {'is' if len(ready) == 1 else 'are'} ready"] if ready else []
    return "; ".join(said + failed)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``xllm`` entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command is None:
        args.command = "serve"  # plain ``xllm`` runs the node
    try:
        config = _config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        shown = _show_config(config)
        if args.json:
            print(json.dumps(shown, indent=2))
        else:
            print_table([["SETTING", "VALUE"]] + [[key, str(value)] for key, value in shown.items()])
        return 0
    if args.command == "models":
        rows = _list_models(config)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print_table(
                [["MODEL", "BYTES", "PARTIAL", "PATH"]]
                + [[r["model_id"], str(r["total_bytes"]), str(r["partial_bytes"]), r["path"]] for r in rows],
                right=["BYTES", "PARTIAL"],
            )
        return 0
    configure_logging(config.log_format, config.log_level)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if args.command == "pull":
        return _pull_command(config, args.model_ids, as_json=args.json)
    from node.process import serve

    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
