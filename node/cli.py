"""``xllm``: the node worker's command line: serve, show the configuration, list local models."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common.config import NodeConfig, load_node_config, parse_optional_listen
from common.console_output import TransferProgress, console, print_table
from common.logs import configure_logging
from common.version import VersionAction

ENV_HELP = """\
environment (flags win over these; $LLMLB_HOME/.env, default ~/.llmlb/.env, is read after the environment):
  XLLM_MODELS_DIR              where the node keeps model files (then LLM_MODELS_DIR, then ~/.llmlb/models)
  LLM_MODELS_DIR               older name of XLLM_MODELS_DIR, still honoured
  XLLM_SHARED_DIR              shared (NFS) models dir used in place, never copied: <dir>/<model-id>/<file>
  XLLM_SHARED_DIR_TIMEOUT      seconds a shared-dir lookup may take before it is skipped (default 2)
  XLLM_LOCAL_SCAN_INTERVAL     seconds between looks for model folders placed by hand in the models and
                               shared dirs, listed by the balancer as local models (default 5; 0: at
                               start only)
  XLLM_BALANCER                balancer gRPC address host:port, or several comma-separated (replicas
                               sharing one store): the node attaches to one and fails over to the next
                               by itself (then LLMLB_ADDR; default 127.0.0.1:50051)
  XLLM_GRPC_LISTEN             host:port the node's gRPC server binds (default 127.0.0.1:50061)
  XLLM_BULK_PORT               port of the bulk (HTTP range) server peers read files from, on the gRPC
                               host (default 50062; 0: any free port, as when the gRPC port is 0)
  XLLM_BULK_LISTEN             host:port of the bulk server instead, or "off" (peers use ReadBlob)
  XLLM_ADVERTISE               host:port the balancer and peers dial (default: the listen address)
  XLLM_NODE_ID                 node id (default: the one saved in $LLMLB_HOME/node-id, else assigned)
  XLLM_BACKEND                 auto, cuda, metal or cpu (default auto: CUDA via NVML, Metal, CPU)
  XLLM_DOWNLOAD_VIA            origin (the hub directly) or balancer (its streaming proxy) (default origin)
  XLLM_ALLOWED_ORIGINS         comma-separated origins the node may download from (default: $HF_ENDPOINT)
  XLLM_MAX_DOWNLOADS           downloads at a time on this node (default 1)
  XLLM_DOWNLOAD_STALL_TIMEOUT  seconds without a byte before a download attempt fails (default 60)
  XLLM_DOWNLOAD_TIMEOUT        seconds one file's download may take in all (default 300)
  XLLM_PEER_FETCH              fetch from peer nodes holding the model first: true/false (default true)
  XLLM_AUTH_TOKEN              a token the node's gRPC port accepts besides the fleet token the
                               balancer hands out; unset, the port still serves only the fleet
  XLLM_API_KEY                 API key (scope node) the node presents to the balancer (default none)
  XLLM_TLS_CA                  CA certificate of the balancer's TLS; set: dial the balancer with TLS
  XLLM_TLS_CERT / XLLM_TLS_KEY client certificate and key for mutual TLS with the balancer
  XLLM_METRICS_LISTEN          host:port of the node's Prometheus GET /metrics (default off)
  XLLM_MAX_BODY_MB             largest gRPC request in MiB, less 1 MiB for the fields beside an upload
                               (then LLMLB_MAX_BODY_MB; default 64: keep it at the balancer's)
  XLLM_MAX_HEADER_KB           largest request head on the bulk and metrics ports (metrics: 16 at most);
                               over it: 431, then closed (then LLMLB_MAX_HEADER_KB; default 64)
  XLLM_HEADER_TIMEOUT          seconds a request's headers may take on those ports (then
                               LLMLB_HEADER_TIMEOUT; default 10)
  XLLM_KEEPALIVE_TIMEOUT       seconds an idle kept-alive bulk connection stays open (then
                               LLMLB_KEEPALIVE_TIMEOUT; default 5)
  XLLM_MAX_CONNECTIONS         open connections per port; more are closed at once (then
                               LLMLB_MAX_CONNECTIONS; default 1024)
  XLLM_DRAIN_TIMEOUT           seconds in-flight requests may take to finish after SIGTERM (default 25,
                               under Kubernetes' 30 s terminationGracePeriodSeconds)
  XLLM_MEMORY_BUDGET_MB        the most memory (MB) the node offers and loads models into; the balancer
                               places by it (default 0: 90% of GPU memory on CUDA, else 75% of RAM)
  XLLM_LABELS                  comma-separated key=value labels deployments' selectors match (default none)
  XLLM_VLLM_COMMAND            command serving safetensors models with vLLM's OpenAI API; the node adds
                               --model, --port and --host; set, it serves them on any backend (default:
                               python -m vllm.entrypoints.openai.api_server on CUDA with vllm installed;
                               otherwise transformers on PyTorch serves them)
  XLLM_LOG_FORMAT / XLLM_LOG_LEVEL   console or json / debug, info, warning, error (then LLMLB_LOG_*)
  OTEL_EXPORTER_OTLP_ENDPOINT  OpenTelemetry collector: set, each call's spans (under the balancer's,
                               from its traceparent) are exported over OTLP (default unset: no traces);
                               OTEL_SERVICE_NAME defaults to xllm; the SDK reads the other OTEL_*
  LLMLB_HOME                   state directory (default ~/.llmlb)
  HF_ENDPOINT                  Hugging Face endpoint (default https://huggingface.co)
  HF_TOKEN                     token for private or gated repositories
"""


def _node_flags(parser: argparse.ArgumentParser, default: Any) -> argparse.ArgumentParser:
    """Where the node keeps and finds models and which balancer it uses: every command takes these."""
    parser.add_argument(
        "--models-dir", type=Path, default=default, help="model files directory (XLLM_MODELS_DIR)"
    )
    parser.add_argument(
        "--shared-dir", type=Path, default=default, help="shared models dir, used in place (XLLM_SHARED_DIR)"
    )
    parser.add_argument(
        "--balancer",
        default=default,
        help="balancer gRPC address, or several comma-separated (XLLM_BALANCER)",
    )
    parser.add_argument("--home", type=Path, default=default, help="state directory (LLMLB_HOME)")
    return parser


def _serve_flags(parser: argparse.ArgumentParser, default: Any) -> argparse.ArgumentParser:
    """How the node serves: ``xllm serve`` takes these, and so does ``xllm`` alone (it serves)."""
    add = functools.partial(parser.add_argument, default=default)
    add("--grpc-listen", help="host:port for gRPC (XLLM_GRPC_LISTEN)")
    add("--advertise", help="host:port the balancer and peers dial (XLLM_ADVERTISE)")
    add("--node-id", help="node id (XLLM_NODE_ID)")
    add("--backend", choices=["auto", "cuda", "metal", "cpu"], help="(XLLM_BACKEND)")
    add("--download-via", choices=["origin", "balancer"], help="(XLLM_DOWNLOAD_VIA)")
    add("--max-downloads", type=int, help="downloads at a time (XLLM_MAX_DOWNLOADS)")
    add("--download-timeout", type=float, help="seconds per file (XLLM_DOWNLOAD_TIMEOUT)")
    add("--download-stall-timeout", type=float, help="seconds without bytes (XLLM_DOWNLOAD_STALL_TIMEOUT)")
    add("--no-peer-fetch", dest="peer_fetch", action="store_false", help="(XLLM_PEER_FETCH=false)")
    add("--metrics-listen", help="host:port for Prometheus GET /metrics; off: none (XLLM_METRICS_LISTEN)")
    add("--api-key", help="key (scope node) for the balancer; visible in ps, prefer XLLM_API_KEY")
    add("--memory-budget-mb", type=int, help="memory offered and loaded into, MB (XLLM_MEMORY_BUDGET_MB)")
    add(
        "--label",
        dest="labels",
        action="append",
        metavar="KEY=VALUE",
        help="a node label for deployments' selectors; repeatable, replaces XLLM_LABELS",
    )
    add("--log-format", choices=["console", "json"], help="(XLLM_LOG_FORMAT)")
    add("--log-level", choices=["debug", "info", "warning", "error"], help="(XLLM_LOG_LEVEL)")
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
    pull.add_argument(
        "--download-via", choices=["origin", "balancer"], default=keep, help="(XLLM_DOWNLOAD_VIA)"
    )
    pull.add_argument(
        "--backend", choices=["auto", "cuda", "metal", "cpu"], default=keep, help="(XLLM_BACKEND)"
    )
    pull.add_argument("--json", action="store_true", help="print JSON")

    models = _node_flags(sub.add_parser("models", help="list the models this node's models dir holds"), keep)
    models.add_argument("--json", action="store_true", help="print JSON")
    return p


def _config(args: argparse.Namespace) -> NodeConfig:
    return load_node_config(
        models_dir=args.models_dir,
        shared_dir=args.shared_dir,
        balancer=args.balancer,
        home=args.home,
        grpc_listen=getattr(args, "grpc_listen", None),
        advertise=getattr(args, "advertise", None),
        node_id=getattr(args, "node_id", None),
        backend=getattr(args, "backend", None),
        download_via=getattr(args, "download_via", None),
        max_downloads=getattr(args, "max_downloads", None),
        download_timeout_s=getattr(args, "download_timeout", None),
        download_stall_timeout_s=getattr(args, "download_stall_timeout", None),
        peer_fetch=getattr(args, "peer_fetch", None),
        log_format=getattr(args, "log_format", None),
        log_level=getattr(args, "log_level", None),
        api_key=getattr(args, "api_key", None),
        metrics_listen=_listen_flag(getattr(args, "metrics_listen", None)),
        memory_budget_mb=getattr(args, "memory_budget_mb", None),
        labels=getattr(args, "labels", None),
    )


def _listen_flag(value: str | None) -> str | None:
    """``--metrics-listen`` as the config holds it (``off``: empty), checked like its variable."""
    if value is None:
        return None
    try:
        return parse_optional_listen(value)
    except ValueError as exc:
        raise ValueError(f"--metrics-listen={value!r}: {exc}") from None


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
    from node.server import assemble

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
    from node.server import serve

    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
