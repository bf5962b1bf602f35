"""The HTTP shim in-process, on a balancer's real parts (SQLite store, catalogue, router, keys), no node.

What a client sees without any node: OpenAI-shaped errors for every refusal, auth by scope, size
limits, the model list and the management reads. Answers that need a node are in the integration tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from openai.types import Model as OpenAIModel
from openai.types import ModelDeleted

from balancer.auth import KeyRing
from balancer.catalog import Catalog, load_catalog
from balancer.fleet.clients import NodeClients
from balancer.fleet.sessions import NodeSessions
from balancer.fleet.token import FleetTokens
from balancer.fleet.view import Fleet
from balancer.http.app import create_app
from balancer.http.streaming import Disconnect, StreamingAnswer
from balancer.origin import Origin
from balancer.parts import BalancerParts
from balancer.replicas import Replicas
from balancer.router import Router
from balancer.store import Store
from common.config import BalancerConfig
from common.errors import ErrorCode, LlmlbError
from common.metrics import BalancerMetrics
from common.types import Scope

CHAT = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}]}


class Shim:
    """The app and keys of each scope, for one test."""

    def __init__(self, parts: BalancerParts, client: httpx.AsyncClient, admin: str, api: str) -> None:
        self.parts = parts
        self.client = client
        self.admin = {"authorization": f"Bearer {admin}"}
        self.api = {"authorization": f"Bearer {api}"}


@pytest.fixture
async def shim(tmp_path: Path) -> AsyncIterator[Shim]:
    config = BalancerConfig(
        home=tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'llmlb.db'}", max_body_mb=1
    )
    store = await Store.open(config.database_url)
    origin = Origin(config)
    catalog = Catalog(store, origin)
    await catalog.seed(load_catalog(None, config.hf_endpoint))
    fleet = Fleet()
    replicas = Replicas(store, database_url=config.database_url, timeout_s=3.0)
    metrics = BalancerMetrics(lambda: {})
    clients = NodeClients()
    keys = KeyRing(store)
    _, admin = await keys.create("admin", [Scope.ADMIN])
    _, api = await keys.create("app", [Scope.API])
    parts = BalancerParts(
        config,
        store,
        origin,
        catalog,
        fleet,
        NodeSessions(store, fleet, replicas, heartbeat_timeout_s=config.heartbeat_timeout_ms / 1000),
        Router(config, catalog, fleet, clients, metrics),
        keys,
        metrics,
        replicas,
        FleetTokens(store, 3600.0),
    )
    transport = httpx.ASGITransport(app=create_app(parts))
    async with httpx.AsyncClient(transport=transport, base_url="http://shim", timeout=10) as client:
        yield Shim(parts, client, admin, api)
    await clients.close()
    await origin.close()
    await keys.settle()
    await store.close()


def error_of(response: httpx.Response, status: int, code: str) -> str:
    """Asserts OpenAI's error shape with ``status`` and ``code``; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == code
    assert "Traceback" not in response.text
    return str(body["error"]["message"])


# -- refusals ------------------------------------------------------------------------------------------


async def test_an_unknown_route_is_a_404_and_a_wrong_method_a_405_in_openai_shape(shim: Shim) -> None:
    missing = await shim.client.post("/v1/nothing-here", headers=shim.api, json={})
    assert "/v1/nothing-here" in error_of(missing, 404, "invalid_request")
    wrong = await shim.client.get("/v1/chat/completions", headers=shim.api)
    error_of(wrong, 405, "invalid_request")
    assert wrong.headers["allow"] == "POST"


async def test_broken_json_and_wrong_types_are_400_not_422(shim: Shim) -> None:
    broken = await shim.client.post("/v1/chat/completions", headers=shim.api, content=b'{"model": ')
    assert "JSON" in error_of(broken, 400, "invalid_request")
    typed = await shim.client.post("/v1/chat/completions", headers=shim.api, json={**CHAT, "max_tokens": "9"})
    assert "max_tokens" in error_of(typed, 400, "invalid_request")
    missing = await shim.client.post("/v1/embeddings", headers=shim.api, json={"model": "gemma-3-270m"})
    assert "'input'" in error_of(missing, 400, "invalid_request")
    n = await shim.client.post("/v1/chat/completions", headers=shim.api, json={**CHAT, "n": 9})
    assert "n must be between 1 and 8" in error_of(n, 400, "invalid_request")


async def test_integers_too_large_for_the_wire_are_400_not_500(shim: Shim) -> None:
    # JSON integers have no size; the node's messages carry int32 and int64 fields.
    for route, body, name in (
        ("/v1/completions", {"model": "gemma-3-270m", "prompt": "x", "max_tokens": 2**40}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "seed": 2**70}, "seed"),
        ("/v1/embeddings", {"model": "gemma-3-270m", "input": "x", "dimensions": 2**40}, "dimensions"),
        ("/v1/images/generations", {"model": "gemma-3-270m", "prompt": "x", "seed": -(2**64)}, "seed"),
    ):
        answer = await shim.client.post(route, headers=shim.admin, json=body)
        assert name in error_of(answer, 400, "invalid_request"), route


async def test_bad_model_ids_are_invalid_model_id_before_any_lookup(shim: Shim) -> None:
    traversal = await shim.client.post(
        "/v1/chat/completions", headers=shim.api, json={**CHAT, "model": "../x"}
    )
    error_of(traversal, 400, "invalid_model_id")
    long_id = await shim.client.get("/v1/models/" + "a" * 300, headers=shim.api)
    error_of(long_id, 400, "invalid_model_id")
    status = await shim.client.get("/v0/models/a..b/status", headers=shim.api)
    error_of(status, 400, "invalid_model_id")


async def test_bodies_over_the_limit_are_413_by_length_and_by_counting(shim: Shim) -> None:
    declared = await shim.client.post("/v1/embeddings", headers=shim.api, content=b"x" * (1024 * 1024 + 1))
    assert "1 MiB" in error_of(declared, 413, "payload_too_large")

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the bytes are counted
        for _ in range(12):
            yield b"y" * 100_000

    counted = await shim.client.post("/v1/chat/completions", headers=shim.api, content=chunked())
    error_of(counted, 413, "payload_too_large")

    async def big_upload() -> AsyncIterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(12):
            yield b"z" * 100_000

    upload = {**shim.api, "content-type": "multipart/form-data; boundary=b"}
    counted_form = await shim.client.post("/v1/audio/transcriptions", headers=upload, content=big_upload())
    error_of(counted_form, 413, "payload_too_large")


async def test_a_missing_key_is_401_and_a_key_without_the_scope_is_403(shim: Shim) -> None:
    error_of(await shim.client.get("/v1/models"), 401, "unauthorized")
    bogus = {"authorization": "Bearer llmlb-not-a-key"}
    error_of(await shim.client.post("/v1/chat/completions", headers=bogus, json=CHAT), 401, "unauthorized")
    delete = await shim.client.delete("/v1/models/gemma-3-270m", headers=shim.api)
    assert "admin" in error_of(delete, 403, "forbidden")
    register = await shim.client.post("/v0/models", headers=shim.api, json={"repo_id": "org/name"})
    error_of(register, 403, "forbidden")
    for path in ("/healthz", "/readyz", "/metrics"):  # probes need no key
        assert (await shim.client.get(path)).status_code == 200, path


async def test_unknown_models_are_404_even_for_streams_and_images(shim: Shim) -> None:
    for path, body in (
        ("/v1/chat/completions", {**CHAT, "model": "acme/none", "stream": True}),
        ("/v1/completions", {"model": "acme/none", "prompt": "x", "stream": True}),
        ("/v1/embeddings", {"model": "acme/none", "input": "x"}),
        ("/v1/audio/speech", {"model": "acme/none", "input": "Hello."}),
        ("/v1/images/generations", {"model": "acme/sd", "prompt": "a cat"}),
    ):
        response = await shim.client.post(path, headers=shim.api, json=body)
        error_of(response, 404, "model_not_found")  # a JSON error, not an event stream
    for path in ("/v1/images/edits", "/v1/images/variations"):
        form = await shim.client.post(
            path,
            headers=shim.api,
            data={"model": "acme/sd", "prompt": "hat"},
            files={"image": ("i.png", b"png")},
        )
        error_of(form, 404, "model_not_found")
    no_image = await shim.client.post(
        "/v1/images/edits", headers=shim.api, data={"model": "acme/sd", "prompt": "x"}
    )
    assert "'image'" in error_of(no_image, 400, "invalid_request")


async def test_a_model_no_node_can_serve_is_503_with_retry_after(shim: Shim) -> None:
    response = await shim.client.post("/v1/chat/completions", headers=shim.api, json=CHAT)
    assert "no online node" in error_of(response, 503, "no_capable_nodes")
    assert int(response.headers["retry-after"]) >= 1


async def test_a_model_lacking_the_capability_is_404(shim: Shim) -> None:
    response = await shim.client.post(
        "/v1/embeddings", headers=shim.api, json={"model": "whisper-base", "input": "x"}
    )
    assert "embedding" in error_of(response, 404, "model_not_found")


async def test_audio_requests_are_checked_before_routing(shim: Shim) -> None:
    mp3 = await shim.client.post(
        "/v1/audio/speech",
        headers=shim.api,
        json={"model": "piper-en-us-joe-medium", "input": "Hi.", "response_format": "mp3"},
    )
    assert "wav" in error_of(mp3, 400, "invalid_request")
    no_file = await shim.client.post(
        "/v1/audio/transcriptions", headers=shim.api, data={"model": "whisper-base"}
    )
    assert "'file'" in error_of(no_file, 400, "invalid_request")
    bad_format = await shim.client.post(
        "/v1/audio/transcriptions",
        headers=shim.api,
        data={"model": "whisper-base", "response_format": "docx"},
        files={"file": ("a.wav", b"RIFF")},
    )
    assert "response_format" in error_of(bad_format, 400, "invalid_request")


async def test_an_unexpected_failure_is_a_500_without_a_traceback(shim: Shim) -> None:
    await shim.parts.store.close()
    for leftover in shim.parts.config.home.glob("llmlb.db*"):  # the store's file is gone: its tables too
        leftover.unlink()
    nodes = await shim.client.get("/v0/nodes", headers=shim.api)
    assert error_of(nodes, 500, "internal_error") == "internal error; see the server log"
    ready = await shim.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
    assert (await shim.client.get("/healthz")).status_code == 200


# -- models and management -----------------------------------------------------------------------------


async def test_models_list_carries_ready_and_nodes_and_parses_as_openai_models(shim: Shim) -> None:
    listed = await shim.client.get("/v1/models", headers=shim.api)
    assert listed.status_code == 200 and listed.json()["object"] == "list"
    data = listed.json()["data"]
    assert [m["id"] for m in data] == ["gemma-3-270m", "piper-en-us-joe-medium", "whisper-base"]
    assert all(m["ready"] is False and m["nodes"] == [] for m in data)
    assert OpenAIModel.model_validate(data[0]).id == "gemma-3-270m"
    one = await shim.client.get("/v1/models/Gemma-3-270M", headers=shim.api)
    assert one.json()["id"] == "gemma-3-270m"


async def test_deleting_a_model_needs_admin_and_then_it_is_gone(shim: Shim) -> None:
    deleted = await shim.client.delete("/v1/models/gemma-3-270m", headers=shim.admin)
    assert deleted.status_code == 200
    assert ModelDeleted.model_validate(deleted.json()) == ModelDeleted(
        id="gemma-3-270m", object="model", deleted=True
    )
    error_of(await shim.client.get("/v1/models/gemma-3-270m", headers=shim.api), 404, "model_not_found")
    error_of(await shim.client.delete("/v1/models/gemma-3-270m", headers=shim.admin), 404, "model_not_found")


async def test_manifest_status_and_nodes_under_v0(shim: Shim) -> None:
    manifest = (
        await shim.client.get("/v0/models/registry/gemma-3-270m/manifest.json", headers=shim.api)
    ).json()
    assert set(manifest) == {"model_id", "repo", "revision", "files", "created_at"}
    [file] = manifest["files"]
    assert file["filename"] == "gemma-3-270m-q4_k_m.gguf" and file["format"] == "gguf"
    assert file["size_bytes"] > 0 and len(file["sha256"]) == 64 and file["backends"]
    status = (await shim.client.get("/v0/models/whisper-base/status", headers=shim.api)).json()
    assert status["model_id"] == "whisper-base" and status["status"] == "absent"
    assert status["total_bytes"] > 0 and status["progress"] == 0.0 and status["nodes"] == []
    models = (await shim.client.get("/v0/models", headers=shim.api)).json()["data"]
    assert {m["id"] for m in models} == {"gemma-3-270m", "piper-en-us-joe-medium", "whisper-base"}
    assert (await shim.client.get("/v0/nodes", headers=shim.api)).json() == {"object": "list", "data": []}
    bad = await shim.client.post(
        "/v0/models", headers=shim.admin, json={"repo_id": "org/x", "capabilities": ["fly"]}
    )
    assert "capabilities" in error_of(bad, 400, "invalid_request")


async def test_a_repo_id_the_hub_client_rejects_is_a_400_not_an_unreachable_origin(shim: Shim) -> None:
    for repo_id in ("\u00b3\u00cc", "org/two..dots", "-leading"):
        bad = await shim.client.post(
            "/v0/models", headers=shim.admin, json={"repo_id": repo_id, "model_id": "x"}
        )
        assert "repo_id" in error_of(bad, 400, "invalid_request")


async def test_readiness_counts_nodes_and_models(shim: Shim) -> None:
    ready = await shim.client.get("/readyz")
    assert ready.json() == {"status": "ready", "nodes": {"registered": 0, "online": 0}, "models": 3}


async def test_http_requests_are_counted_in_the_metrics_by_route_and_code(shim: Shim) -> None:
    await shim.client.post("/v1/chat/completions", headers=shim.api, json=CHAT)
    await shim.client.post(
        "/v1/chat/completions", headers=shim.api, json={**CHAT, "model": "acme/secret-name"}
    )
    scrape = (await shim.client.get("/metrics")).text
    assert (
        'llmlb_requests_total{code="no_capable_nodes",door="http",model="gemma-3-270m",route="chat"} 1.0'
        in scrape
    )
    assert 'llmlb_requests_total{code="model_not_found",door="http",model="",route="chat"} 1.0' in scrape
    assert "acme/secret-name" not in scrape  # names that are not models never become labels


@pytest.mark.parametrize(
    "since", ["inf", "-inf", "1e20", "-1e20", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"]
)
async def test_a_usage_time_no_date_can_hold_is_a_400_naming_since(shim: Shim, since: str) -> None:
    response = await shim.client.get("/v0/usage", params={"since": since}, headers=shim.admin)
    assert error_of(response, 400, "invalid_request").startswith("since is out of range")


async def test_usage_times_at_the_ends_of_the_range_are_answered_in_utc(shim: Shim) -> None:
    for since, shown in (
        ("9999-12-31T23:59:59+00:00", "9999-12-31T23:59:59+00:00"),
        ("9999-12-31T20:00:00-03:00", "9999-12-31T23:00:00+00:00"),
        ("0001-01-01T00:00:00", "0001-01-01T00:00:00+00:00"),
        ("0", "1970-01-01T00:00:00+00:00"),
    ):
        response = await shim.client.get("/v0/usage", params={"since": since}, headers=shim.admin)
        assert response.status_code == 200, response.text
        assert response.json() == {"object": "list", "since": shown, "data": []}


# -- streaming and disconnects ---------------------------------------------------------------------------


async def test_a_client_that_goes_away_closes_the_stream_behind_the_answer_at_once() -> None:
    produced: list[int] = []
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            for n in range(1_000_000):
                produced.append(n)
                yield b"data: x\n\n"
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    sent: list[dict[str, object]] = []
    gone = asyncio.Event()

    async def receive() -> dict[str, object]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)
        if len(sent) == 4:
            gone.set()  # the client hangs up after the third piece

    answer = StreamingAnswer(endless(), media_type="text/event-stream")  # type: ignore[arg-type]
    await asyncio.wait_for(answer({"type": "http"}, receive, send), 5)  # type: ignore[arg-type]
    assert closed.is_set() and len(produced) < 10


async def test_work_for_a_client_that_went_away_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "late"

    async def hang_up() -> dict[str, object]:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    with pytest.raises(LlmlbError) as err:
        await asyncio.wait_for(Disconnect(hang_up)(slow()), 5)  # type: ignore[arg-type]
    assert err.value.code is ErrorCode.CANCELLED and cancelled.is_set()

    async def never() -> dict[str, object]:
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def quick() -> str:
        return "done"

    assert await Disconnect(never)(quick()) == "done"  # type: ignore[arg-type]


async def test_a_stream_whose_first_send_fails_still_closes_its_producer() -> None:
    cleaned = asyncio.Event()

    async def producer() -> AsyncIterator[bytes]:
        try:
            yield b"data: first\n\n"
            yield b"data: second\n\n"
        finally:
            cleaned.set()  # where a router stream would cancel its node call

    async def receive() -> dict[str, object]:
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        raise OSError("connection reset by peer")

    answer = StreamingAnswer(producer(), media_type="text/event-stream")  # type: ignore[arg-type]
    await asyncio.wait_for(answer({"type": "http"}, receive, send), 5)  # type: ignore[arg-type]
    assert cleaned.is_set()


# -- deployments -------------------------------------------------------------------------------------


async def test_a_deployment_is_set_read_and_ended_by_scope_with_clear_refusals(shim: Shim) -> None:
    url = "/v0/models/gemma-3-270m/deployment"
    refused = await shim.client.put(url, headers=shim.api, json={"copies": 2})
    error_of(refused, 403, "forbidden")
    both = await shim.client.put(url, headers=shim.admin, json={"copies": 2, "max_copies": 3})
    assert "either copies or max_copies" in error_of(both, 400, "invalid_request")
    too_many = await shim.client.put(url, headers=shim.admin, json={"copies": 100_000})
    assert "copies must be" in error_of(too_many, 400, "invalid_request")
    bad_label = await shim.client.put(url, headers=shim.admin, json={"copies": 1, "selector": {"zone": ""}})
    assert "selector" in error_of(bad_label, 400, "invalid_request")
    unknown = await shim.client.put("/v0/models/no-such-model/deployment", headers=shim.admin, json={})
    error_of(unknown, 404, "model_not_found")
    error_of(await shim.client.get(url, headers=shim.api), 404, "model_not_found")

    put = await shim.client.put(url, headers=shim.admin, json={"min_copies": 0, "max_copies": 3})
    assert put.status_code == 200, put.text
    body = put.json()
    assert (body["copies"], body["min_copies"], body["max_copies"], body["desired_copies"]) == (None, 0, 3, 0)
    read = await shim.client.get(url, headers=shim.api)
    assert read.json()["max_copies"] == 3
    # Not yet seen by a scheduler (none runs here): explained as such, not a 500.
    error_of(
        await shim.client.get("/v0/models/gemma-3-270m/placement", headers=shim.api), 404, "model_not_found"
    )
    events = await shim.client.get("/v0/events", headers=shim.api)
    assert events.json() == {"acting": False, "data": []}
    error_of(await shim.client.delete(url, headers=shim.api), 403, "forbidden")
    gone = await shim.client.delete(url, headers=shim.admin)
    assert gone.json() == {"model_id": "gemma-3-270m", "deleted": True}
    error_of(await shim.client.delete(url, headers=shim.admin), 404, "model_not_found")
