"""The access log (``LLMLB_ACCESS_LOG=on``): one line per request on either door, naming the key by its
id and never its secret; off by default.

An in-process balancer with both doors and an echo node (``devkit.echo_node``) shows every field of a
line; a real ``llmlb serve`` shows the line as its JSON log writes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.types import Scope
from devkit.echo_node import EchoNode
from devkit.fake_hub import FakeHub
from tests.fixtures.doors import CALL_TIMEOUT_S, Doors, grpc_error, http_error, open_doors
from tests.fixtures.eventually import eventually
from tests.integration.conftest import BalancerProcess

pytestmark = pytest.mark.timeout(120)
MODEL = "gemma-3-270m"


async def own_key_id(doors: Doors, scope: Scope) -> str:
    reply = await doors.http.get("/v0/me", headers=doors.headers(scope))
    assert reply.status_code == 200, reply.text
    return str(reply.json()["id"])


async def requests_on_both_doors(doors: Doors) -> None:
    """An answered HTTP chat (api key), an answered gRPC chat (admin key), a refused HTTP chat."""
    reply = await doors.http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "one two three"}]},
        headers=doors.headers(Scope.API),
    )
    assert reply.status_code == 200, reply.text
    request = ipb.ChatRequest(model=MODEL, messages=[ipb.ChatMessage(role="user", content="four five")])
    chunks = doors.inference.Chat(request, timeout=CALL_TIMEOUT_S, metadata=doors.metadata(Scope.ADMIN))
    assert [c async for c in chunks]
    refused = await doors.http.post(
        "/v1/chat/completions",
        json={"model": "acme/nothing", "messages": [{"role": "user", "content": "hi"}]},
        headers=doors.headers(Scope.API),
    )
    assert http_error(refused)[0] == 404
    await grpc_error(doors.inference.Chat(ipb.ChatRequest(model=MODEL), metadata=doors.metadata(Scope.API)))


def access_lines(events: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in events if e["event"] == "access"]


async def test_each_request_on_either_door_is_one_access_line_with_its_key_id_status_tokens_and_node(
    tmp_path: Path,
) -> None:
    async with open_doors(tmp_path / "balancer", {"LLMLB_ACCESS_LOG": "on"}) as doors:
        node = EchoNode(f"127.0.0.1:{doors.balancer.port}", api_key=doors.secrets[Scope.NODE], node_id="echo")
        await node.start()
        try:
            api_id, admin_id = await own_key_id(doors, Scope.API), await own_key_id(doors, Scope.ADMIN)
            with capture_logs() as events:
                await requests_on_both_doors(doors)
        finally:
            await node.stop()
    lines = access_lines(events)
    assert [(e["door"], e["key_id"], e["code"], e["status"]) for e in lines] == [
        ("http", api_id, "ok", "200"),
        ("grpc", admin_id, "ok", "OK"),
        ("http", api_id, "model_not_found", "404"),
        ("grpc", api_id, "invalid_request", "INVALID_ARGUMENT"),
    ]
    http_ok, grpc_ok = lines[0], lines[1]
    assert http_ok["method"] == "POST /v1/chat/completions" and grpc_ok["method"] is None
    for line in (http_ok, grpc_ok):
        assert (line["route"], line["model"], line["node"]) == ("chat", MODEL, "echo")
        assert line["prompt_tokens"] > 0 and line["completion_tokens"] > 0
        assert 0 < line["duration_ms"] < CALL_TIMEOUT_S * 1000
    assert lines[2]["node"] is None and lines[2]["completion_tokens"] == 0
    text = json.dumps(events)
    assert all(secret not in text for secret in doors.secrets.values())


async def test_without_the_setting_no_access_line_is_written(tmp_path: Path) -> None:
    async with open_doors(tmp_path / "balancer") as doors:
        with capture_logs() as events:
            refused = await doors.http.post(
                "/v1/chat/completions",
                json={"model": "acme/nothing", "messages": [{"role": "user", "content": "hi"}]},
                headers=doors.headers(Scope.API),
            )
            assert http_error(refused)[0] == 404
    assert access_lines(events) == []


def test_a_real_balancer_writes_the_access_line_in_its_json_log_without_the_secret(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub
) -> None:
    balancer = balancer_factory(hub, LLMLB_ACCESS_LOG="on")
    reply = httpx.post(
        f"{balancer.http_url}/v1/chat/completions",
        json={"model": "acme/nothing", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {balancer.admin_key}"},
        timeout=10,
    )
    assert reply.status_code == 404
    me = httpx.get(f"{balancer.http_url}/v0/me", headers={"authorization": f"Bearer {balancer.admin_key}"})

    def logged() -> list[dict[str, Any]]:
        return [json.loads(line) for line in balancer.log().splitlines() if '"event": "access"' in line]

    eventually(logged, 5, "an access line in the balancer's log", describe=balancer.log)
    assert len(logged()) == 1, balancer.log()
    line = logged()[0]
    assert (line["door"], line["method"], line["status"], line["key_id"]) == (
        "http",
        "POST /v1/chat/completions",
        "404",
        me.json()["id"],
    )
    assert line["level"] == "info" and "timestamp" in line
    assert balancer.admin_key not in balancer.log()
