"""Abuse drill, node-reported junk names: a registered node that lies cannot grow the balancer's
``/metrics`` or the console's history.

A real balancer (both doors on 127.0.0.1) and a misbehaving node built from the echo node: it speaks
the real node protocol with a node key, but its heartbeats report 200 made-up model ids as
downloading and every answer names a different made-up node id. After 200 answers on both doors the
number of ``/metrics`` series is what one honest answer left, no made-up name is a label, and the
history lists only the catalogue's model and the registered node. Removing the node and deleting the
model then drops their history series too.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from common import converters
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.types import ModelOnNode, ModelState, Scope
from devkit.echo_node import EchoNode
from tests.fixtures.doors import CALL_TIMEOUT_S, Doors, open_doors
from tests.fixtures.eventually import eventually_async

pytestmark = pytest.mark.timeout(60)

MODEL = "gemma-3-270m"
JUNK_MODELS = 200
ANSWERS = 200  # half on each door


class LyingNode(EchoNode):
    """An echo node that, once ``lying`` is set, reports made-up models and answers under made-up ids."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lying = False
        self._ids = itertools.count()

    def _heartbeat(self) -> rpb.NodeMessage:
        message = super()._heartbeat()
        if self.lying:
            message.heartbeat.models.extend(
                converters.model_on_node_to_pb(
                    ModelOnNode(self.node_id, f"made-up-{i}", ModelState.DOWNLOADING, 1, 2)
                )
                for i in range(JUNK_MODELS)
            )
        return message

    async def echo(self, *args: Any, **kwargs: Any) -> AsyncGenerator[ipb.TextChunk, None]:
        claimed = f"impostor-{next(self._ids)}"
        async for chunk in super().echo(*args, **kwargs):
            if self.lying:
                chunk.node_id = claimed
            yield chunk


def sample_lines(text: str) -> set[str]:
    """Every series in a scrape: its name and labels, without the value."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


async def chat_http(doors: Doors, text: str, stream: bool) -> None:
    response = await doors.http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": stream},
        headers=doors.headers(Scope.API),
    )
    assert response.status_code == 200, response.text


async def chat_grpc(doors: Doors, text: str) -> None:
    request = ipb.ChatRequest(model=MODEL, messages=[ipb.ChatMessage(role="user", content=text)])
    chunks = doors.inference.Chat(request, timeout=CALL_TIMEOUT_S, metadata=doors.metadata(Scope.API))
    assert "".join([chunk.delta async for chunk in chunks]) == text


async def one_of_each(doors: Doors, text: str) -> None:
    await chat_http(doors, text, stream=False)
    await chat_http(doors, text, stream=True)
    await chat_grpc(doors, text)


async def history(doors: Doors) -> dict[str, Any]:
    response = await doors.http.get("/v0/history", headers=doors.headers(Scope.ADMIN))
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_junk_names_from_a_node_add_no_metric_series_and_no_history_series(tmp_path: Path) -> None:
    async with open_doors(tmp_path / "home", {"LLMLB_HEARTBEAT_INTERVAL_MS": "100"}) as doors:
        balancer = f"127.0.0.1:{doors.balancer.port}"
        node = LyingNode(balancer, api_key=doors.secrets[Scope.NODE], models=(MODEL,))
        await node.start()
        try:
            await one_of_each(doors, "honest answer")
            honest = sample_lines(await doors.metrics_text())

            node.lying = True
            fleet = doors.balancer.parts.fleet
            await eventually_async(
                lambda: len(fleet.node_models(node.node_id)) == 1 + JUNK_MODELS,
                what="the made-up models reported in a heartbeat",
            )
            for i in range(ANSWERS // 3 + 1):
                await one_of_each(doors, f"answer {i}")
            assert node.total_calls >= ANSWERS

            scrape = await doors.metrics_text()
            assert "made-up" not in scrape and "impostor" not in scrape
            grown = sample_lines(scrape) - honest
            # What the lies are counted under: one fixed (empty) label each, not one per made-up name.
            fixed = {
                f'llmlb_prompt_tokens_{sample}{{model="{MODEL}",node="",source="{source}"}}'
                for sample in ("total", "created")
                for source in ("computed", "cached")
            }
            assert grown <= {'llmlb_model_downloads{model=""}', *fixed}, sorted(grown)[:10]
            assert 'llmlb_model_downloads{model=""} 200.0' in scrape

            seen = await history(doors)
            assert (seen["models"], seen["nodes"]) == ([MODEL], [node.node_id])
            assert sum(p["requests"] for p in seen["series"]["points"]) >= ANSWERS

            # The node removed and the model deleted: their series are gone from the history.
            removed = await doors.http.delete(f"/v0/nodes/{node.node_id}", headers=doors.headers(Scope.ADMIN))
            assert removed.status_code == 200, removed.text
            deleted = await doors.http.delete(f"/v1/models/{MODEL}", headers=doors.headers(Scope.ADMIN))
            assert deleted.status_code == 200, deleted.text
            after = await history(doors)
            assert (after["models"], after["nodes"]) == ([], [])
        finally:
            await node.stop()
