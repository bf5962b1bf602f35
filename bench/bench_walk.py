"""The walk of one chat request: which of the project's modules it enters from a door to the router.

The balancer runs in this process with a profiler hook (``sys.setprofile``) on, an echo node
(``devkit.echo_node``) in a second process; after a few warm-up requests, one non-streamed chat
request is sent through each door (and a streamed one through HTTP; gRPC's ``Chat`` always streams) and
every call and return in the balancer's modules is recorded.
The walk runs from the door's handler to the router's first call, in the request's own task. A module
is *left* once no frame of it remains (a coroutine suspended at an ``await`` is still on the walk);
*re-entered* is a new call into a module that was left. Goal (the inference-plane step): each module
entered once, no re-entries.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import grpc.aio
import httpx

from balancer.server import start
from common.channels import bearer_metadata
from common.config import load_balancer_config
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.rpc import CHANNEL_OPTIONS
from devkit.request_walk import Recorder, Walk, walk_of

MODEL = "gemma-3-270m"
WARMUP = 5
DOORS = {
    "http": "balancer.http.openai_routes",
    "http, streamed": "balancer.http.openai_routes",
    "grpc": "balancer.servicers.inference",
}


def _node_main(conn: Any, balancer: str, key: str) -> None:
    from bench.bench_routing import _node_main as serve_echo_node

    serve_echo_node(conn, balancer, key)


async def _walks() -> dict[str, Walk]:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        config = load_balancer_config(
            home=Path(tmp),
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            env={"LLMLB_HOME": tmp},
            log_level="warning",
        )
        balancer = await start(config)
        key = config.admin_key_file.read_text().strip()
        ours, theirs = ctx.Pipe()
        node = ctx.Process(target=_node_main, args=(theirs, f"127.0.0.1:{balancer.port}", key), daemon=True)
        node.start()
        walks: dict[str, Walk] = {}
        try:
            await asyncio.get_running_loop().run_in_executor(None, ours.recv)
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            message = ipb.ChatRequest(
                model=MODEL,
                messages=[ipb.ChatMessage(role="user", content="hi")],
                params=ipb.SamplingParams(max_tokens=1),
            )
            async with (
                httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{balancer.http_port}",
                    headers={"authorization": f"Bearer {key}"},
                    timeout=30,
                ) as client,
                grpc.aio.insecure_channel(f"127.0.0.1:{balancer.port}", options=CHANNEL_OPTIONS) as channel,
            ):
                stub = igrpc.InferenceStub(channel)

                async def http() -> None:
                    (await client.post("/v1/chat/completions", json=body)).raise_for_status()

                async def http_streamed() -> None:
                    streamed = {**body, "stream": True}
                    async with client.stream("POST", "/v1/chat/completions", json=streamed) as answer:
                        answer.raise_for_status()
                        async for _ in answer.aiter_bytes():
                            pass

                async def grpc_door() -> None:
                    async for _ in stub.Chat(message, metadata=bearer_metadata(key), timeout=30):
                        pass

                for name, send in (("http", http), ("http, streamed", http_streamed), ("grpc", grpc_door)):
                    for attempt in range(40):  # until the node has registered and the model is ready
                        try:
                            await send()
                            break
                        except (httpx.HTTPStatusError, grpc.aio.AioRpcError):
                            if attempt == 39:
                                raise
                            await asyncio.sleep(0.25)
                    for _ in range(WARMUP):
                        await send()
                    recorder = Recorder()
                    sys.setprofile(recorder)
                    try:
                        await send()
                    finally:
                        sys.setprofile(None)
                    walks[name] = walk_of(recorder.events, DOORS[name])
        finally:
            ours.send(("stop",))
            node.join(10)
            if node.is_alive():
                node.kill()
            await balancer.stop()
    return walks


async def run() -> str:
    walks = await _walks()
    lines = [
        "## Request walk: the modules one chat request enters from a door to the router",
        "",
        __doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
        "",
        "| door | modules entered | re-entered after leaving | modules, in order of first entry |",
        "|---|---|---|---|",
    ]
    for name, walk in walks.items():
        shown = " → ".join(f"`{m.removeprefix('balancer.')}`" for m in walk.modules)
        lines.append(f"| {name} | {len(walk.modules)} | {len(walk.reentries)} | {shown} |")
    lines.append("")
    for name, walk in walks.items():
        counted = Counter(r.rsplit(".", 1)[0] for r in walk.reentries)
        listed = ", ".join(
            f"`{m.removeprefix('balancer.')}` " + (f"{n} times" if n > 1 else "once")
            for m, n in counted.most_common()
        )
        met = "met" if not walk.reentries else "not met"
        lines.append(
            f"- {name}: {len(walk.reentries)} re-entries (goal 0: {met}){': ' if listed else ''}{listed}"
        )
    for name, walk in walks.items():
        if walk.reentries:
            calls = ", ".join(f"`{r.removeprefix('balancer.')}`" for r in walk.reentries)
            lines.append(f"- {name}, each re-entering call in order: {calls}")
    return "\n".join(lines)
