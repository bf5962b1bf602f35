"""Usage per key and model through both doors (the Responses API included): each request is counted
for the key that made it, an ``api`` key reads only its own, and what was counted survives a graceful
stop and restart.

One balancer in this process with both doors and an echo node (``devkit.echo_node``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.types import Scope
from devkit.echo_node import EchoNode
from tests.fixtures.doors import CALL_TIMEOUT_S, Doors, http_error, open_doors

pytestmark = pytest.mark.timeout(120)
MODEL = "gemma-3-270m"


async def own_key_id(doors: Doors, scope: Scope) -> str:
    reply = await doors.http.get("/v0/me", headers=doors.headers(scope))
    assert reply.status_code == 200, reply.text
    return str(reply.json()["id"])


async def test_both_doors_count_usage_for_the_calling_key_and_an_api_key_sees_only_its_own(
    tmp_path: Path,
) -> None:
    home = tmp_path / "balancer"
    async with open_doors(home) as doors:
        node = EchoNode(f"127.0.0.1:{doors.balancer.port}", api_key=doors.secrets[Scope.NODE], node_id="echo")
        await node.start()
        try:
            api_id, admin_id = await own_key_id(doors, Scope.API), await own_key_id(doors, Scope.ADMIN)
            reply = await doors.http.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "one two three"}]},
                headers=doors.headers(Scope.API),
            )
            assert reply.status_code == 200, reply.text
            response = await doors.http.post(  # the Responses API is counted like chat
                "/v1/responses", json={"model": MODEL, "input": "six seven"}, headers=doors.headers(Scope.API)
            )
            assert response.status_code == 200, response.text
            request = ipb.ChatRequest(
                model=MODEL, messages=[ipb.ChatMessage(role="user", content="four five")]
            )
            chunks = [
                c
                async for c in doors.inference.Chat(
                    request, timeout=CALL_TIMEOUT_S, metadata=doors.metadata(Scope.ADMIN)
                )
            ]
            assert chunks
        finally:
            await node.stop()

        everyone = (await doors.http.get("/v0/usage", headers=doors.headers(Scope.ADMIN))).json()["data"]
        assert {(r["key_id"], r["model"], r["requests"]) for r in everyone} == {
            (api_id, MODEL, 2),
            (admin_id, MODEL, 1),
        }
        assert all(r["completion_tokens"] > 0 for r in everyone)

        own = (await doors.http.get("/v0/usage", headers=doors.headers(Scope.API))).json()["data"]
        assert [r["key_id"] for r in own] == [api_id]
        refused = await doors.http.get(f"/v0/usage?key={admin_id}", headers=doors.headers(Scope.API))
        assert http_error(refused)[0] == 403

    # Stopped gracefully before any periodic flush was due: a restart still finds every request.
    async with open_doors(home) as restarted:
        rows = (await restarted.http.get("/v0/usage", headers=restarted.headers(Scope.ADMIN))).json()["data"]
        assert sorted(r["requests"] for r in rows) == [1, 2]
