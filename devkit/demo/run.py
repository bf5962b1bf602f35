"""The demo: a balancer and one node on this machine serving the three packaged models, in one command.

It lays gemma-3-270m, whisper-base and the Piper voice out as a shared dir under ``$LLMLB_HOME/demo``,
starts ``llmlb serve`` and ``xllm serve --shared-dir`` as child processes (logs in ``demo/logs``), gives
the node a node-scoped key made with the balancer's admin key, pulls the three models onto the node,
speaks a sample sentence through the balancer, prints how to call each model, and runs until Ctrl-C
stops both children.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import grpc
import httpx

from balancer.catalog import load_catalog
from balancer.cli.client import ClientSettings, describe_rpc_error, read_admin_key
from balancer.cli.progress import pull_and_wait
from common.channels import open_channel
from common.config import llmlb_home, parse_listen
from common.errors import ErrorCode, LlmlbError
from common.logs import configure_logging
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from devkit import packaged_models
from devkit.demo.banner import DemoDirs, banner
from devkit.demo.children import Child, check_alive, child_env, dial, start, until

DEMO_MODELS = (packaged_models.GEMMA, packaged_models.WHISPER, packaged_models.PIPER)
NODE_KEY_NAME = "demo-node"
SAMPLE_SENTENCE = "The quick brown fox jumps over the lazy dog."
SPEECH_TIMEOUT_S = 120.0

DEMO_HELP = """\
files (under $LLMLB_HOME/demo, default ~/.llmlb/demo):
  shared/        the packaged models as a shared dir, <model-id>/<file>, written on the first run
  balancer/      the balancer's state: llmlb.db and admin-key
  node/          the node's state: node-id and its models dir
  logs/          balancer.log and node.log
  hello.wav      a sentence the demo's voice spoke, to try transcription with

environment: LLMLB_HOME (default ~/.llmlb). Other LLMLB_* / XLLM_* tuning settings (log level, queue
sizes, XLLM_BACKEND, XLLM_GPU_LAYERS, ...) reach the children; addresses, state dirs, keys and TLS
settings do not: the demo sets its own.
"""


def parser() -> argparse.ArgumentParser:
    """The demo's flags (``make run`` passes none)."""
    p = argparse.ArgumentParser(
        prog="python -m devkit.demo",
        description=__doc__,
        epilog=DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--home", type=Path, help="state directory; the demo uses <home>/demo (LLMLB_HOME)")
    p.add_argument("--grpc-listen", default="127.0.0.1:50051", help="balancer gRPC host:port")
    p.add_argument("--http-listen", default="127.0.0.1:8080", help="balancer HTTP (OpenAI API) host:port")
    p.add_argument("--node-listen", default="127.0.0.1:50061", help="node gRPC host:port")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds the models may take to be ready (default 600)"
    )
    return p


def _speech_sample(base_url: str, api_key: str, path: Path) -> Path:
    """A WAV of the demo's voice saying ``SAMPLE_SENTENCE``, spoken through the balancer once (blocking)."""
    if path.is_file() and path.stat().st_size > 1000:
        return path
    reply = httpx.post(
        f"{base_url}/audio/speech",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": packaged_models.PIPER, "input": SAMPLE_SENTENCE, "response_format": "wav"},
        timeout=SPEECH_TIMEOUT_S,
    )
    if reply.status_code != 200:
        raise LlmlbError(ErrorCode.INTERNAL, f"speech answered {reply.status_code}: {reply.text[:300]}")
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(reply.content)
    partial.replace(path)
    return path


async def _wait_serving(grpc_addr: str, children: list[Child]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with open_channel(grpc_addr) as plain:
        health = health_pb2_grpc.HealthStub(plain)

        async def serving() -> bool:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except Exception:  # any failure here means "not up yet"; a dead child is caught by `until`
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await until("the balancer answering", serving, children)


async def _demo(args: argparse.Namespace, children: list[Child]) -> None:
    try:
        grpc_listen, http_listen = parse_listen(args.grpc_listen), parse_listen(args.http_listen)
        node_listen = parse_listen(args.node_listen)
    except ValueError as exc:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, f"listen address: {exc}") from None
    dirs = DemoDirs((args.home or llmlb_home()).expanduser().resolve() / "demo")
    configure_logging("console", "warning")  # the terminal shows the banner; the children log to files
    grpc_addr = dial(grpc_listen)
    base_url = f"http://{dial(http_listen)}/v1"

    print(f"preparing the models in {dirs.shared} (the first run writes about 400 MB)", flush=True)
    catalogue = {m.id: m for m in load_catalog(None, "")}
    for model_id in DEMO_MODELS:
        await asyncio.to_thread(packaged_models.lay_out, catalogue[model_id], dirs.shared)

    print(f"starting the balancer on {grpc_listen} (HTTP {http_listen})", flush=True)
    balancer = start(
        "balancer",
        ["balancer.cli", "serve", "--grpc-listen", grpc_listen, "--http-listen", http_listen, "--auth"],
        child_env(dirs.balancer),
        dirs.logs / "balancer.log",
    )
    children.append(balancer)
    await _wait_serving(grpc_addr, children)

    async def admin_key() -> str:
        return read_admin_key(dirs.balancer)

    api_key = await until(f"an admin key in {dirs.balancer}", admin_key, children)
    async with ClientSettings(grpc_addr, api_key=api_key).channel() as channel:
        stub = rgrpc.RegistryStub(channel)
        for old in (await stub.ListKeys(rpb.ListKeysRequest())).keys:
            if old.name == NODE_KEY_NAME and not old.HasField("revoked_at"):  # one live demo-node key
                await stub.RevokeKey(rpb.RevokeKeyRequest(key=old.id))
        # A node id belongs to the key that registered it: on a later run the new key is bound to the
        # node's id (kept in its home), which hands the id over to it.
        id_file = dirs.node / "node-id"
        kept_id = id_file.read_text().strip() if id_file.is_file() else ""
        node_key = await stub.CreateKey(
            rpb.CreateKeyRequest(name=NODE_KEY_NAME, scopes=[pb.SCOPE_NODE], node_id=kept_id)
        )

        print(f"starting a node on {node_listen} with the shared dir {dirs.shared}", flush=True)
        node = start(
            "node",
            [
                "node.cli",
                "serve",
                "--balancer",
                grpc_addr,
                "--grpc-listen",
                node_listen,
                "--shared-dir",
                str(dirs.shared),
                "--models-dir",
                str(dirs.node / "models"),
                "--home",
                str(dirs.node),
            ],
            child_env(dirs.node, XLLM_API_KEY=node_key.secret),
            dirs.logs / "node.log",
        )
        children.append(node)

        async def online_node() -> str:
            try:
                node_id = id_file.read_text().strip()
            except OSError:
                return ""
            listed = await stub.ListNodes(rpb.ListNodesRequest())
            online = any(n.id == node_id and n.state == pb.NODE_STATE_ONLINE for n in listed.nodes)
            return node_id if online else ""

        node_id = await until("the node online", online_node, children)
        print(f"node {node_id} is online; pulling {', '.join(DEMO_MODELS)} onto it", flush=True)
        pulling = asyncio.create_task(
            pull_and_wait(stub, DEMO_MODELS, [node_id], out=sys.stdout, timeout_s=args.timeout)
        )
        try:
            while not pulling.done():
                check_alive(children)
                await asyncio.wait({pulling}, timeout=0.5)
        finally:
            pulling.cancel()
        await pulling
        listed = await stub.ListNodes(rpb.ListNodesRequest())
        node_addr = next((n.address for n in listed.nodes if n.id == node_id), node_listen)

    try:
        sample_path = str(await asyncio.to_thread(_speech_sample, base_url, api_key, dirs.sample))
    except (LlmlbError, httpx.HTTPError) as exc:  # the sample is a convenience: the snippets still work
        print(f"(no sample audio: {exc})", flush=True)
        sample_path = "speech.wav"
    print(
        banner(
            base_url=base_url,
            api_key=api_key,
            grpc_addr=grpc_addr,
            node_id=node_id,
            node_addr=node_addr,
            dirs=dirs,
            sample=sample_path,
        ),
        flush=True,
    )
    while True:  # until Ctrl-C; a child that dies ends the demo with its log
        check_alive(children)
        await asyncio.sleep(0.5)


async def _main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    children: list[Child] = []
    stopping = False

    def on_signal() -> None:
        nonlocal stopping
        if stopping:  # a second Ctrl-C: no more waiting
            for child in children:
                child.kill()
            return
        stopping = True
        main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    code = 0
    try:
        await _demo(args, children)
    except asyncio.CancelledError:
        if not stopping:
            raise
    except LlmlbError as exc:
        print(f"demo: {exc.code.value}: {exc.message}", file=sys.stderr, flush=True)
        code = 1
    except grpc.RpcError as exc:
        print(f"demo: {describe_rpc_error(exc, args.grpc_listen)}", file=sys.stderr, flush=True)
        code = 1
    except OSError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        running = [c for c in reversed(children) if c.exited() is None]  # the node first: it leaves cleanly
        if running:
            print(f"stopping the {' and the '.join(c.name for c in running)}", flush=True)
        for child in running:
            status = await child.stop()
            if status != 0:
                print(f"the {child.name} exited with status {status}; see {child.log_path}", file=sys.stderr)
                code = 1
    return code


def main(argv: list[str] | None = None) -> int:
    """Runs the demo until Ctrl-C (exit 0) or until something fails (exit 1, with the reason)."""
    args = parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_main(args))
    return 0
