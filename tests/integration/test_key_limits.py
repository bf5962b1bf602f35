"""Per-key limits and budgets through both doors: the 429 in OpenAI's shape, the ``x-ratelimit-*``
headers (read back by the official ``openai`` client), requests in flight that finish past a budget,
and a model list that hides every other model.

One balancer in this process with both doors and an echo node (``devkit.echo_node``). The limiter's
clock is pinned mid-minute, so a minute boundary never falls inside a test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import openai
import pytest

from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from common.types import Scope
from devkit.echo_node import EchoNode
from tests.fixtures.doors import CALL_TIMEOUT_S, Doors, grpc_error, http_error, open_doors
from tests.fixtures.eventually import eventually_async

pytestmark = pytest.mark.timeout(120)
MODEL = "gemma-3-270m"
PINNED = datetime.now(UTC).replace(second=30, microsecond=0)  # 30 s before its minute ends


@asynccontextmanager
async def doors_with_node(tmp_path: Path) -> AsyncIterator[tuple[Doors, EchoNode]]:
    async with open_doors(tmp_path / "balancer") as doors:
        doors.balancer.parts.limits.clock = lambda: PINNED
        node = EchoNode(f"127.0.0.1:{doors.balancer.port}", api_key=doors.secrets[Scope.NODE], node_id="echo")
        await node.start()
        try:
            yield doors, node
        finally:
            await node.stop()


async def new_key(doors: Doors, **limits: Any) -> tuple[str, str]:
    """A new api key with ``limits``, made through ``POST /v0/keys``: (its id, its secret)."""
    reply = await doors.http.post(
        "/v0/keys", json={"name": "app", "scopes": ["api"], **limits}, headers=doors.headers(Scope.ADMIN)
    )
    assert reply.status_code == 201, reply.text
    made = reply.json()
    assert made["limits"] == {
        "rpm": 0,
        "tpm": 0,
        "max_parallel": 0,
        "daily_tokens": 0,
        "monthly_tokens": 0,
        "models": [],
        **limits,
    }
    return made["id"], made["secret"]


def client(doors: Doors, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{doors.balancer.http_port}/v1", api_key=secret, max_retries=0
    )


def chat_body(model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "one two three"}]}


def grpc_chat(doors: Doors, secret: str, model: str = MODEL) -> Any:
    request = ipb.ChatRequest(model=model, messages=[ipb.ChatMessage(role="user", content="one two three")])
    return doors.inference.Chat(
        request, timeout=CALL_TIMEOUT_S, metadata=(("authorization", f"Bearer {secret}"),)
    )


async def test_requests_per_minute_hold_on_both_doors_with_openai_headers_and_429s(tmp_path: Path) -> None:
    async with doors_with_node(tmp_path) as (doors, _):
        _, secret = await new_key(doors, rpm=3)
        oai = client(doors, secret)

        first = await oai.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert first.parse().choices[0].message.content
        assert first.headers["x-ratelimit-limit-requests"] == "3"
        assert first.headers["x-ratelimit-remaining-requests"] == "2"
        assert first.headers["x-ratelimit-reset-requests"] == "30s"

        call = grpc_chat(doors, secret)
        assert [c async for c in call]
        answered: Any = await call.trailing_metadata()
        assert dict(answered)["x-ratelimit-remaining-requests"] == "1"

        third = await doors.http.post(
            "/v1/chat/completions", json=chat_body(), headers={"authorization": f"Bearer {secret}"}
        )
        assert third.status_code == 200 and third.headers["x-ratelimit-remaining-requests"] == "0"

        with pytest.raises(openai.RateLimitError) as caught:
            await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        refused = caught.value.response
        assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"

        status, error = await grpc_error(grpc_chat(doors, secret))
        assert status is grpc.StatusCode.RESOURCE_EXHAUSTED and error.code.value == "rate_limit_exceeded"
        call = grpc_chat(doors, secret)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in call:
                pass
        metadata: Any = failed.value.trailing_metadata() or ()
        trailing = dict(metadata)
        assert trailing["retry-after"] == "30" and trailing["x-ratelimit-limit-requests"] == "3"

        # An operator lifts the limit: the key works again at once, and its answers carry no headers.
        lifted = await doors.registry.UpdateKey(
            rpb.UpdateKeyRequest(key=secret[:12], limits=pb.KeyLimits(rpm=0), set=["rpm"]),
            metadata=doors.metadata(Scope.ADMIN),
        )
        assert lifted.limits.rpm == 0
        again = await doors.http.post(
            "/v1/chat/completions", json=chat_body(), headers={"authorization": f"Bearer {secret}"}
        )
        assert again.status_code == 200 and "x-ratelimit-limit-requests" not in again.headers


async def test_a_spent_daily_budget_refuses_new_requests_on_both_doors_but_those_in_flight_finish(
    tmp_path: Path,
) -> None:
    async with doors_with_node(tmp_path) as (doors, node):
        key_id, secret = await new_key(doors, daily_tokens=4)
        auth = {"authorization": f"Bearer {secret}"}
        node.hold()
        in_flight = [
            asyncio.ensure_future(doors.http.post("/v1/chat/completions", json=chat_body(), headers=auth)),
            asyncio.ensure_future(doors.http.post("/v1/chat/completions", json=chat_body(), headers=auth)),
        ]
        # Both admitted with the whole budget left, and held at the node.
        await eventually_async(lambda: node.total_calls == 2, what="both requests at the node")
        node.release()
        answers = await asyncio.gather(*in_flight)
        assert [a.status_code for a in answers] == [200, 200]  # 2 x (3 + 3) tokens: past the budget, finished
        assert answers[0].headers["x-ratelimit-limit-tokens"] == "4"

        status, error = http_error(
            await doors.http.post("/v1/chat/completions", json=chat_body(), headers=auth)
        )
        assert status == 429 and error.code.value == "insufficient_quota"
        refused = await doors.http.post("/v1/chat/completions", json=chat_body(), headers=auth)
        assert refused.json()["error"]["type"] == "insufficient_quota"
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
        assert int(refused.headers["retry-after"]) > 0
        status_g, error_g = await grpc_error(grpc_chat(doors, secret))
        assert status_g is grpc.StatusCode.RESOURCE_EXHAUSTED and error_g.code.value == "insufficient_quota"

        # The usage the budget is counted from is the usage operators read.
        usage = (await doors.http.get(f"/v0/usage?key={key_id}", headers=doors.headers(Scope.ADMIN))).json()
        assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in usage["data"]) >= 4


async def test_requests_in_flight_beyond_max_parallel_are_refused_until_one_ends(tmp_path: Path) -> None:
    async with doors_with_node(tmp_path) as (doors, node):
        _, secret = await new_key(doors, max_parallel=1)
        auth = {"authorization": f"Bearer {secret}"}
        node.hold()
        held = asyncio.ensure_future(doors.http.post("/v1/chat/completions", json=chat_body(), headers=auth))
        await eventually_async(lambda: node.total_calls == 1, what="the first request at the node")
        status, error = http_error(
            await doors.http.post("/v1/chat/completions", json=chat_body(), headers=auth)
        )
        assert status == 429 and error.code.value == "rate_limit_exceeded"
        status_g, _ = await grpc_error(grpc_chat(doors, secret))
        assert status_g is grpc.StatusCode.RESOURCE_EXHAUSTED
        node.release()
        assert (await held).status_code == 200
        assert [c async for c in grpc_chat(doors, secret)]


async def test_a_key_with_a_model_list_sees_and_uses_only_those_models_on_both_doors(tmp_path: Path) -> None:
    async with doors_with_node(tmp_path) as (doors, _):
        _, secret = await new_key(doors, models=[MODEL])
        auth = {"authorization": f"Bearer {secret}"}
        listed = await doors.http.get("/v1/models", headers=auth)
        assert [m["id"] for m in listed.json()["data"]] == [MODEL]
        everything = await doors.http.get("/v1/models", headers=doors.headers(Scope.API))
        assert "whisper-base" in [m["id"] for m in everything.json()["data"]]  # it is in the catalogue

        hidden = await doors.http.get("/v1/models/whisper-base", headers=auth)
        missing = await doors.http.get("/v1/models/no-such-model", headers=auth)
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["error"]["message"] == "model 'whisper-base' not found"
        assert missing.json()["error"]["message"] == "model 'no-such-model' not found"

        status, error = http_error(
            await doors.http.post("/v1/chat/completions", json=chat_body("whisper-base"), headers=auth)
        )
        assert status == 404 and error.code.value == "model_not_found"
        status_g, error_g = await grpc_error(grpc_chat(doors, secret, "whisper-base"))
        assert status_g is grpc.StatusCode.NOT_FOUND and error_g.message == "model 'whisper-base' not found"
        ok = await doors.http.post("/v1/chat/completions", json=chat_body(), headers=auth)
        assert ok.status_code == 200, ok.text


async def test_limits_are_changed_and_cleared_through_patch_and_bad_values_are_refused(
    tmp_path: Path,
) -> None:
    async with open_doors(tmp_path / "balancer") as doors:
        key_id, _ = await new_key(doors, rpm=5, tpm=100)
        admin = doors.headers(Scope.ADMIN)
        changed = await doors.http.patch(
            f"/v0/keys/{key_id}", json={"rpm": 0, "daily_tokens": 7, "models": ["Org/A"]}, headers=admin
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["limits"] == {
            "rpm": 0,
            "tpm": 100,
            "max_parallel": 0,
            "daily_tokens": 7,
            "monthly_tokens": 0,
            "models": ["org/a"],
        }
        listed = (await doors.http.get("/v0/keys", headers=admin)).json()["data"]
        assert [k["limits"]["daily_tokens"] for k in listed if k["id"] == key_id] == [7]
        negative = await doors.http.patch(f"/v0/keys/{key_id}", json={"tpm": -1}, headers=admin)
        assert http_error(negative)[0] == 400
        nothing = await doors.http.patch(f"/v0/keys/{key_id}", json={}, headers=admin)
        assert http_error(nothing)[0] == 400
        unknown = await doors.http.patch("/v0/keys/key-nosuch", json={"rpm": 1}, headers=admin)
        assert http_error(unknown)[0] == 404
        forbidden = await doors.http.patch(
            f"/v0/keys/{key_id}", json={"rpm": 1}, headers=doors.headers(Scope.API)
        )
        assert http_error(forbidden)[0] == 403


async def test_each_kind_of_bad_limit_is_refused_on_both_doors_and_the_key_keeps_its_limits(
    tmp_path: Path,
) -> None:
    async with open_doors(tmp_path / "balancer") as doors:
        key_id, secret = await new_key(doors, rpm=5, models=["gemma-3-270m"])
        admin = doors.headers(Scope.ADMIN)

        async def limits_now() -> dict[str, Any]:
            listed = (await doors.http.get("/v0/keys", headers=admin)).json()["data"]
            found: dict[str, Any] = next(k["limits"] for k in listed if k["id"] == key_id)
            return found

        before = await limits_now()
        bad_bodies: list[Any] = [
            {"rpm": -1},
            {"tpm": "many"},
            {"max_parallel": 1.5},
            {"daily_tokens": 2**70},
            {"monthly_tokens": None},
            {"models": "gemma-3-270m"},
            {"models": ["../etc/passwd"]},
            {"models": [""]},
            {"rpm": 1, "burst": 3},
            ["rpm", 1],
        ]
        for body in bad_bodies:
            reply = await doors.http.patch(f"/v0/keys/{key_id}", json=body, headers=admin)
            status, error = http_error(reply)
            assert status == 400, (body, reply.text)
            assert error.message, body  # says what is wrong
            if body == {"rpm": 1, "burst": 3}:
                assert error.message == "unknown parameter: 'burst'"
        not_json = await doors.http.patch(
            f"/v0/keys/{key_id}", content=b"{rpm: 1", headers={**admin, "content-type": "application/json"}
        )
        assert http_error(not_json)[0] == 400
        made_bad = await doors.http.post(
            "/v0/keys", json={"name": "bad", "scopes": ["api"], "rpm": -3}, headers=admin
        )
        assert http_error(made_bad)[0] == 400

        bad_requests = [
            rpb.UpdateKeyRequest(key=key_id, limits=pb.KeyLimits(rpm=-1), set=["rpm"]),
            rpb.UpdateKeyRequest(key=key_id, limits=pb.KeyLimits(tpm=5), set=["burst"]),
            rpb.UpdateKeyRequest(key=key_id, limits=pb.KeyLimits(models=["../x"]), set=["models"]),
            rpb.UpdateKeyRequest(key=key_id, limits=pb.KeyLimits(rpm=3), set=[]),
        ]
        for request in bad_requests:
            status_g, error_g = await grpc_error(
                doors.registry.UpdateKey(
                    request, metadata=doors.metadata(Scope.ADMIN), timeout=CALL_TIMEOUT_S
                )
            )
            assert status_g is grpc.StatusCode.INVALID_ARGUMENT, (request, error_g)
            assert error_g.message, request
        missing = await grpc_error(
            doors.registry.UpdateKey(
                rpb.UpdateKeyRequest(key="key-nosuch", limits=pb.KeyLimits(rpm=1), set=["rpm"]),
                metadata=doors.metadata(Scope.ADMIN),
                timeout=CALL_TIMEOUT_S,
            )
        )
        assert missing[0] is grpc.StatusCode.NOT_FOUND

        assert await limits_now() == before  # nothing refused changed anything
        assert secret  # the key itself still works: its limits are where they were
