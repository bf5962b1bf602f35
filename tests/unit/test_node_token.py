"""The node's gRPC door: with no setting it refuses Inference and Manifest calls that carry neither the
fleet token (handed over at registration) nor the node's own ``XLLM_AUTH_TOKEN``; health stays open.
The balancer's channels present the token, a peer that refuses it is skipped, and the fleet's status
counts the node's bytes."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from balancer.fleet.clients import NodeClients
from balancer.fleet.view import Fleet, NodeInfo
from common.channels import bearer_metadata, open_channel
from common.config import load_node_config
from common.errors import GRPC_CODE_KEY, ErrorCode
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.rpc import SERVER_OPTIONS, error_from_rpc
from common.secret import Secret
from common.types import Backend, FileFormat, ManifestFile, Model, ModelOnNode, ModelSource, ModelState
from node.blob_sources import ReadBlobSource
from node.downloader import Downloader
from node.storage import Storage
from node.token_auth import NodeCredentials, server_interceptors

TOKEN = "fleet-secret-1"
FLEET = "fleet-token-from-the-balancer"
DATA = bytes(range(256)) * 1024  # 256 KiB
Ctx = grpc.aio.ServicerContext[Any, Any]


class _Inference(igrpc.InferenceServicer):
    """Answers Embed (unary) and Complete (server-streaming), the two call kinds the node serves."""

    async def Embed(self, request: ipb.EmbedRequest, context: Ctx) -> ipb.EmbedResponse:
        return ipb.EmbedResponse(model=request.model, data=[ipb.Embedding(index=0, values=[1.0])])

    async def Complete(self, request: ipb.CompleteRequest, context: Ctx) -> AsyncIterator[ipb.TextChunk]:
        for word in request.prompt.split():
            yield ipb.TextChunk(delta=word)


class _Manifest(mgrpc.ManifestServicer):
    """Serves ``DATA`` as every file, from the asked offset."""

    async def ReadBlob(self, request: mpb.ReadBlobRequest, context: Ctx) -> AsyncIterator[mpb.BlobChunk]:
        for start in range(request.offset, len(DATA), 64 * 1024):
            yield mpb.BlobChunk(offset=start, data=DATA[start : start + 64 * 1024])


class NodeDoor:
    """A gRPC server built as the node builds its own: Inference, Manifest, health, behind its credentials."""

    def __init__(self, token: str, listen: str = "127.0.0.1:0") -> None:
        self.credentials = NodeCredentials(Secret(token))
        interceptors = server_interceptors(self.credentials)
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        # Only the calls these tests make are implemented; the rest answer UNIMPLEMENTED.
        igrpc.add_InferenceServicer_to_server(_Inference(), self.server)  # type: ignore[abstract]
        mgrpc.add_ManifestServicer_to_server(_Manifest(), self.server)  # type: ignore[abstract]
        self.health: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(listen)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def start_door() -> AsyncIterator[Any]:
    doors: list[NodeDoor] = []

    async def start(token: str = TOKEN, listen: str = "127.0.0.1:0") -> NodeDoor:
        door = NodeDoor(token, listen)
        await door.server.start()
        await door.health.set("", health_pb2.HealthCheckResponse.SERVING)
        doors.append(door)
        return door

    yield start
    for door in doors:
        await door.server.stop(None)


async def embed(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> ipb.EmbedResponse:
    stub = igrpc.InferenceStub(channel)
    return await stub.Embed(ipb.EmbedRequest(model="m", input=["x"]), metadata=metadata or None, timeout=5)


async def complete(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    stub = igrpc.InferenceStub(channel)
    call = stub.Complete(ipb.CompleteRequest(model="m", prompt="a b c"), metadata=metadata or None, timeout=5)
    return "".join([chunk.delta async for chunk in call])


async def stub_read(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> bytes:
    call = mgrpc.ManifestStub(channel).ReadBlob(
        mpb.ReadBlobRequest(model_id="m", filename="w.gguf"), metadata=metadata, timeout=5
    )
    return b"".join([chunk.data async for chunk in call])


def _model(*files: ManifestFile) -> Model:
    return Model("acme/m", "acme/m", ModelSource.HF, "acme/m", "abc", "http://127.0.0.1:9", files=list(files))


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value


def unauthorized(refused: grpc.aio.AioRpcError) -> bool:
    """UNAUTHENTICATED with llmlb's ``unauthorized`` code in the trailers, like every other refusal."""
    trailing: Any = refused.trailing_metadata() or ()
    coded = (GRPC_CODE_KEY, ErrorCode.UNAUTHORIZED.value) in list(trailing)
    return refused.code() is grpc.StatusCode.UNAUTHENTICATED and coded


async def test_with_nothing_set_a_node_refuses_every_call_until_it_registers_and_health_stays_open(
    start_door: Any,
) -> None:
    door = await start_door(token="")
    async with grpc.aio.insecure_channel(door.address) as channel:
        assert unauthorized(await refusal(embed(channel)))
        assert unauthorized(await refusal(complete(channel, bearer_metadata("anything"))))
        # An empty bearer never matches the unset token or the fleet token not yet known.
        assert unauthorized(await refusal(embed(channel, (("authorization", "Bearer "),))))
        assert unauthorized(await refusal(stub_read(channel, ())))
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_fleet_token_opens_the_door_once_registered_and_nothing_else_does(start_door: Any) -> None:
    door = await start_door(token="")
    door.credentials.set_fleet_token(FLEET)  # what the link does with RegisterNodeResponse.fleet_token
    async with grpc.aio.insecure_channel(door.address) as channel:
        assert (await embed(channel, bearer_metadata(FLEET))).data[0].values == [1.0]
        assert await complete(channel, bearer_metadata(FLEET)) == "abc"
        assert await stub_read(channel, bearer_metadata(FLEET)) == DATA
        assert unauthorized(await refusal(embed(channel)))
        assert unauthorized(await refusal(embed(channel, bearer_metadata(FLEET[:-1]))))
    # A registration that brings no token (an older balancer) keeps the one the node has.
    door.credentials.set_fleet_token("")
    assert door.credentials.for_peers() == FLEET
    assert FLEET not in repr(door.credentials)


async def test_the_nodes_own_token_and_the_fleet_token_are_both_accepted(start_door: Any) -> None:
    door = await start_door(token=TOKEN)
    assert door.credentials.for_peers() == TOKEN  # before registering: the node's own, as xllm pull does
    door.credentials.set_fleet_token(FLEET)
    assert door.credentials.for_peers() == FLEET  # every registered node accepts the fleet's
    async with grpc.aio.insecure_channel(door.address) as channel:
        assert await complete(channel, bearer_metadata(TOKEN)) == "abc"
        assert await complete(channel, bearer_metadata(FLEET)) == "abc"
        assert unauthorized(await refusal(complete(channel, bearer_metadata("fleet-secret-2"))))
    assert TOKEN not in repr(door.credentials)


async def test_a_call_without_the_token_or_with_a_wrong_one_is_unauthenticated(start_door: Any) -> None:
    door = await start_door()
    async with grpc.aio.insecure_channel(door.address) as channel:
        missing = await refusal(embed(channel))
        assert unauthorized(missing)
        assert "XLLM_AUTH_TOKEN" in (missing.details() or "")
        wrong = await refusal(complete(channel, bearer_metadata("fleet-secret-2")))
        assert wrong.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "does not match" in (wrong.details() or "")
        other_scheme = await refusal(embed(channel, (("authorization", f"Basic {TOKEN}"),)))
        assert other_scheme.code() is grpc.StatusCode.UNAUTHENTICATED
        peer_read = stub_read(channel, bearer_metadata(TOKEN[:-1]))
        assert (await refusal(peer_read)).code() is grpc.StatusCode.UNAUTHENTICATED
        assert error_from_rpc(missing).code is ErrorCode.UNAUTHORIZED


async def test_the_right_token_passes_on_unary_and_streaming_calls_and_health_stays_open(
    start_door: Any,
) -> None:
    door = await start_door()
    async with grpc.aio.insecure_channel(door.address) as bare:
        reply = await health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert await stub_read(bare, bearer_metadata(TOKEN)) == DATA
    # A channel opened with the token presents it on unary and streaming calls alike.
    async with open_channel(door.address, api_key=TOKEN) as channel:
        assert (await embed(channel)).data[0].values == [1.0]
        assert await complete(channel) == "abc"


async def test_the_balancer_presents_the_token_a_node_registered_with_and_the_new_one_after_it_changes(
    start_door: Any,
) -> None:
    first = await start_door(TOKEN)
    fleet, clients = Fleet(), NodeClients()
    try:
        fleet.registered(NodeInfo("n1", first.address, auth_token=TOKEN))
        stub: Any = clients.stub("n1", first.address, fleet.token("n1"))
        reply = await stub.Embed(ipb.EmbedRequest(model="m", input=["x"]), timeout=5)
        assert reply.model == "m"

        # The node restarts with a new token (same address) and registers again.
        await first.server.stop(None)
        await start_door("fleet-secret-2", listen=first.address)
        fleet.registered(NodeInfo("n1", first.address, auth_token="fleet-secret-2"))
        fresh: Any = clients.stub("n1", first.address, fleet.token("n1"))
        streamed = fresh.Complete(ipb.CompleteRequest(model="m", prompt="a b"), timeout=5)
        assert "".join([c.delta async for c in streamed]) == "ab"
        assert clients.stub("n1", first.address, fleet.token("n1")) is fresh  # one channel, kept
    finally:
        await clients.close()


def test_the_fleet_keeps_a_nodes_token_out_of_its_printed_record() -> None:
    fleet = Fleet()
    info = NodeInfo("n1", "10.0.0.5:50061", auth_token=TOKEN)
    fleet.registered(info)
    assert fleet.token("n1") == TOKEN and fleet.token("unknown") == ""
    assert TOKEN not in repr(info) and TOKEN not in repr(fleet.info("n1"))


@pytest.fixture
def io_threads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


class CountingSource:
    """Wraps a source and counts how often the downloader opened it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.opened = 0

    async def stream(
        self, model: Model, file: ManifestFile, offset: int, length: int = 0
    ) -> AsyncIterator[bytes]:
        self.opened += 1
        async for chunk in self.inner.stream(model, file, offset):
            yield chunk


async def test_a_peer_that_refuses_the_token_is_skipped_once_for_the_next_source(
    start_door: Any, tmp_path: Path, io_threads: ThreadPoolExecutor
) -> None:
    refusing, serving = await start_door("their-token"), await start_door(TOKEN)
    config = load_node_config(models_dir=tmp_path / "models", home=tmp_path, env={})
    storage = Storage(config.models_dir, io_threads)
    file = ManifestFile("w.gguf", FileFormat.GGUF, len(DATA), hashlib.sha256(DATA).hexdigest())
    model = _model(file)
    async with (  # peer channels as link.peer_sources opens them: presenting this node's token
        open_channel(refusing.address, api_key=TOKEN) as a,
        open_channel(serving.address, api_key=TOKEN) as b,
    ):
        first = CountingSource(ReadBlobSource("peer:refusing", a))
        second = CountingSource(ReadBlobSource("peer:serving", b))
        path = await Downloader(storage, config).fetch(model, file, [first, second])
    assert path.read_bytes() == DATA
    assert (first.opened, second.opened) == (1, 1)  # refused: no retries against the same peer


def test_status_counts_a_nodes_progress_against_the_files_it_needs_so_a_finished_download_is_whole() -> None:
    gguf = ManifestFile("m.gguf", FileFormat.GGUF, 1000, "", (Backend.CPU, Backend.CUDA))
    metal = ManifestFile("m.metal.bin", FileFormat.METAL, 3000, "", (Backend.METAL,))
    model = _model(gguf, metal)  # 4000 bytes in all; a CPU node needs 1000 of them
    fleet = Fleet()
    fleet.registered(NodeInfo("cpu", "127.0.0.1:1"))
    fleet.connected("cpu")

    fleet.report(ModelOnNode("cpu", "acme/m", ModelState.DOWNLOADING, downloaded_bytes=500, total_bytes=1000))
    halfway = fleet.status(model)
    assert (halfway.progress, halfway.downloaded_bytes, halfway.total_bytes) == (0.5, 500, 1000)

    done = ModelOnNode("cpu", "acme/m", ModelState.DOWNLOADING, downloaded_bytes=1000, total_bytes=1000)
    fleet.report(done)
    assert fleet.status(model).progress == 1.0

    # A node that reports no total (a runtime's loading / ready state) falls back to the manifest's.
    fleet.report(ModelOnNode("cpu", "acme/m", ModelState.READY))
    ready = fleet.status(model)
    assert (ready.progress, ready.total_bytes) == (1.0, 4000)
