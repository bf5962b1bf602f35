"""The balancer's metadata read path: GetManifest through the gRPC door vs the same logic called directly.

"catalogue direct" does what the servicer does (look the model up, build the manifest message) without
transport; the difference to the door is what gRPC adds. Goal: the door adds at most 0.5 ms at p50.
"store read" shows what serving reads from SQLite instead of the catalogue's in-memory copy would cost.
Auth is on, as by default: the door's figure includes checking the admin key each call presents.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from balancer.server import start
from common import converters
from common.channels import open_channel
from common.config import load_balancer_config
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc

SEQUENTIAL = 2000
CONCURRENT = 4000
IN_FLIGHT = 32
GOAL_P50_MS = 0.5


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def run() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        config = load_balancer_config(
            home=Path(tmp),
            grpc_listen="127.0.0.1:0",
            http_listen="",  # no HTTP door: this measures the gRPC one
            env={"LLMLB_HOME": tmp},
            log_level="warning",
        )
        balancer = await start(config)
        try:
            stored: list[float] = []
            for _ in range(SEQUENTIAL // 4):
                t = time.perf_counter()
                assert await balancer.store.get_model("gemma-3-270m") is not None
                stored.append(time.perf_counter() - t)
            direct: list[float] = []
            for _ in range(SEQUENTIAL):
                t = time.perf_counter()
                converters.manifest_to_pb(await balancer.catalog.get("gemma-3-270m"))
                direct.append(time.perf_counter() - t)

            key = config.admin_key_file.read_text().strip()
            async with open_channel(f"127.0.0.1:{balancer.port}", api_key=key) as channel:
                stub = mgrpc.ManifestStub(channel)
                request = mpb.GetManifestRequest(model_id="gemma-3-270m")
                for _ in range(50):  # warm the connection
                    await stub.GetManifest(request)
                door: list[float] = []
                for _ in range(SEQUENTIAL):
                    t = time.perf_counter()
                    await stub.GetManifest(request)
                    door.append(time.perf_counter() - t)

                left = CONCURRENT

                async def worker() -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        await stub.GetManifest(request)

                t = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
                rps = CONCURRENT / (time.perf_counter() - t)
        finally:
            await balancer.stop(grace=0)

    def row(name: str, samples: list[float]) -> str:
        return f"| {name} | {_pct(samples, 0.5):.3f} | {_pct(samples, 0.99):.3f} |"

    added = statistics.median(door) * 1000 - statistics.median(direct) * 1000
    verdict = "met" if added <= GOAL_P50_MS else "missed"
    return "\n".join(
        [
            "## Metadata read path: GetManifest",
            "",
            f"{SEQUENTIAL} sequential calls each way; then {CONCURRENT} calls with {IN_FLIGHT} in flight. "
            "The gRPC client runs in the balancer's own process and event loop, so the door's figure "
            "includes the Python client's cost as well as the server's. Auth is on: each call presents "
            "the admin key and the door checks it.",
            "",
            "| path | p50 ms | p99 ms |",
            "|---|---|---|",
            row(f"store read (SQLite, {SEQUENTIAL // 4} calls)", stored),
            row("catalogue direct (same work, no transport)", direct),
            row("through the gRPC door", door),
            "",
            f"- gRPC door adds {added:.3f} ms at p50 (goal ≤ {GOAL_P50_MS} ms: {verdict})",
            f"- ratio door/direct at p50: {statistics.median(door) / statistics.median(direct):.2f}x",
            f"- throughput through the door: {rps:,.0f} requests/s ({IN_FLIGHT} in flight)",
            "",
        ]
    )
