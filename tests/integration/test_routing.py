"""The balancer's gRPC Inference door in front of two real nodes serving the packaged models.

An internal service calls the balancer's stubs exactly as it would call a node; the balancer picks
the node, carries deadlines and cancellation there, and retries elsewhere when a node dies.
"""

from __future__ import annotations

import io
import re
import signal
import threading
import wave
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import pytest

from common.errors import ErrorCode
from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.rpc import error_from_rpc
from devkit import packaged_models
from devkit.fake_hub import FakeHub
from devkit.model_files import CACHE, ModelFiles, catalogue_model
from tests.fixtures.eventually import eventually
from tests.fixtures.models import SENTENCE, assert_heard, words
from tests.integration.conftest import BalancerProcess, NodeProcess, sync_channel, wait_online

pytestmark = pytest.mark.slow
NodeFactory = Callable[..., NodeProcess]
FAST_BEATS = {"LLMLB_HEARTBEAT_INTERVAL_MS": "200", "LLMLB_HEARTBEAT_TIMEOUT_MS": "1500"}


def queue_depth(balancer: BalancerProcess) -> float:
    """Requests waiting for a node, as the balancer's ``/metrics`` reports them."""
    scrape = httpx.get(f"{balancer.http_url}/metrics", timeout=5).text
    found = re.search(r"^llmlb_queue_depth (\S+)$", scrape, re.M)
    assert found, scrape[:2000]
    return float(found.group(1))


def repeated(clip: bytes, times: int) -> bytes:
    """The WAV ``clip`` said ``times`` times over: a longer job for the node."""
    with wave.open(io.BytesIO(clip)) as wav:
        params = wav.getparams()
        frames = wav.readframes(wav.getnframes())
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setparams(params._replace(nframes=0))
        wav.writeframes(frames * times)
    return out.getvalue()


def inference(balancer: BalancerProcess) -> tuple[grpc.Channel, igrpc.InferenceStub]:
    channel = sync_channel(balancer.address, balancer.admin_key)
    return channel, igrpc.InferenceStub(channel)


def test_an_internal_service_gets_every_capability_through_the_balancer(
    balancer_factory: Callable[..., BalancerProcess],
    hub: FakeHub,
    node_factory: NodeFactory,
    gemma: ModelFiles,
    whisper: ModelFiles,
    speech_clip: bytes,
) -> None:
    packaged_models.lay_out(catalogue_model(packaged_models.PIPER), CACHE)  # the voice in the shared dir too
    balancer = balancer_factory(hub)
    nodes = [node_factory(balancer, hub, "--shared-dir", str(CACHE)) for _ in range(2)]
    wait_online(balancer, *nodes, within=15)
    ids = {n.node_id for n in nodes}
    channel, stub = inference(balancer)
    with channel:
        chunks = list(
            stub.Chat(
                ipb.ChatRequest(
                    model="gemma-3-270m",
                    messages=[ipb.ChatMessage(role="user", content="Say hello.")],
                    params=ipb.SamplingParams(max_tokens=8, temperature=0.0),
                ),
                timeout=120,
            )
        )
        assert len(chunks) >= 2 and "".join(c.delta for c in chunks).strip()
        assert chunks[-1].finish_reason in (ipb.FINISH_REASON_STOP, ipb.FINISH_REASON_LENGTH)
        assert chunks[-1].node_id in ids and chunks[-1].usage.completion_tokens > 0
        assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id  # assigned by the balancer

        completion = list(
            stub.Complete(
                ipb.CompleteRequest(
                    model="gemma-3-270m",
                    prompt="One, two, three, four,",
                    params=ipb.SamplingParams(max_tokens=4, temperature=0.0),
                ),
                timeout=120,
            )
        )
        assert "five" in "".join(c.delta for c in completion).lower()

        embedded = stub.Embed(ipb.EmbedRequest(model="gemma-3-270m", input=["a cat", "a dog"]), timeout=120)
        assert [e.index for e in embedded.data] == [0, 1] and len(embedded.data[0].values) > 100
        assert embedded.node_id in ids

        transcript = stub.Transcribe(
            ipb.TranscribeRequest(model="whisper-base", audio=speech_clip, filename="clip.wav"), timeout=120
        )
        assert_heard(transcript.text, SENTENCE)  # Piper's voice varies a little from run to run
        assert transcript.node_id in ids

        audio = list(
            stub.Speak(ipb.SpeakRequest(model="piper-en-us-joe-medium", input="Hello there."), timeout=120)
        )
        assert audio[0].data.startswith(b"RIFF") and sum(len(a.data) for a in audio) > 10_000

        # What the balancer refuses, it refuses with the contract's codes, before any node is bothered.
        for model, code in (("acme/none", ErrorCode.MODEL_NOT_FOUND), ("../etc", ErrorCode.INVALID_MODEL_ID)):
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Complete(ipb.CompleteRequest(model=model, prompt="x"), timeout=10))
            assert error_from_rpc(refused.value).code is code
        with pytest.raises(grpc.RpcError) as lacking:  # whisper cannot embed
            stub.Embed(ipb.EmbedRequest(model="whisper-base", input=["x"]), timeout=10)
        assert error_from_rpc(lacking.value).code is ErrorCode.MODEL_NOT_FOUND
        with pytest.raises(grpc.RpcError) as bad:
            list(
                stub.Complete(
                    ipb.CompleteRequest(
                        model="gemma-3-270m", prompt="x", params=ipb.SamplingParams(temperature=7.0)
                    ),
                    timeout=10,
                )
            )
        assert error_from_rpc(bad.value).code is ErrorCode.INVALID_REQUEST


def test_a_node_killed_mid_request_is_routed_around_and_the_unary_call_is_retried(
    balancer_factory: Callable[..., BalancerProcess],
    hub: FakeHub,
    node_factory: NodeFactory,
    whisper: ModelFiles,
    speech_clip: bytes,
) -> None:
    balancer = balancer_factory(hub, **FAST_BEATS)
    nodes = {
        n.node_id: n for n in (node_factory(balancer, hub, "--shared-dir", str(CACHE)) for _ in range(2))
    }
    wait_online(balancer, *nodes.values(), within=15)
    long_clip = repeated(speech_clip, 8)
    channel, stub = inference(balancer)
    # Temperature 0: greedy decoding with no sampling fallback, so one node gives one text for one clip.
    long_job = ipb.TranscribeRequest(
        model="whisper-base", audio=long_clip, filename="long.wav", temperature=0.0
    )
    with channel, ThreadPoolExecutor(1) as pool:
        pending: Future[ipb.TranscribeResponse] = pool.submit(stub.Transcribe, long_job, timeout=180)

        def busy_node() -> str:  # the node the balancer chose reports the request in its next heartbeat
            assert not pending.done(), "the transcription finished before a node could be killed"
            listed = balancer.registry.ListNodes(rpb.ListNodesRequest()).nodes
            return next((n.id for n in listed if n.load.active_requests or n.load.queued_requests), "")

        busy = eventually(busy_node, 30, "a node reporting the transcription")
        nodes[busy].stop(signal.SIGKILL)
        transcript = pending.result(timeout=180)
        survivor = next(n for n in nodes if n != busy)
        assert transcript.node_id == survivor
        assert "fox" in words(transcript.text)
        # The retried answer is exactly what the survivor says for this audio when asked afresh.
        assert stub.Transcribe(long_job, timeout=180).text == transcript.text
        with wave.open(io.BytesIO(long_clip)) as wav:  # the whole clip was heard, not a piece
            assert transcript.duration > 0.95 * wav.getnframes() / wav.getframerate()

        # New requests go to the node that is left, without errors.
        for _ in range(3):
            again = stub.Transcribe(
                ipb.TranscribeRequest(model="whisper-base", audio=speech_clip, filename="clip.wav"),
                timeout=60,
            )
            assert again.node_id == survivor


def test_busy_nodes_queue_requests_then_refuse_with_queue_full_and_time_out(
    balancer_factory: Callable[..., BalancerProcess],
    hub: FakeHub,
    node_factory: NodeFactory,
    gemma: ModelFiles,
) -> None:
    # One call at a time on the node: one slot it reports, no allowance, and the cap until it reports.
    balancer = balancer_factory(
        hub,
        LLMLB_NODE_MAX_INFLIGHT="1",
        LLMLB_NODE_QUEUE_ALLOWANCE="0",
        LLMLB_QUEUE_SIZE="1",
        LLMLB_QUEUE_TIMEOUT="1.5",
        **FAST_BEATS,
    )
    node = node_factory(balancer, hub, "--shared-dir", str(CACHE), XLLM_SLOTS_PER_MODEL="1")
    wait_online(balancer, node, within=15)
    channel, stub = inference(balancer)
    long = ipb.CompleteRequest(
        model="gemma-3-270m",
        prompt="Once upon a time",
        params=ipb.SamplingParams(max_tokens=400, temperature=0.0),
    )
    with channel:
        first: Any = stub.Complete(long, timeout=120)
        started = next(first)  # the node is generating: its one slot on the balancer is taken
        assert started.delta or started.request_id
        outcomes: list[ErrorCode] = []

        def queued() -> None:
            try:
                list(stub.Complete(ipb.CompleteRequest(model="gemma-3-270m", prompt="x"), timeout=30))
            except grpc.RpcError as exc:
                outcomes.append(error_from_rpc(exc).code)

        waiter = threading.Thread(target=queued)
        waiter.start()
        eventually(lambda: queue_depth(balancer) == 1, 10, "the second request waiting in the queue of one")
        with pytest.raises(grpc.RpcError) as full:
            list(stub.Complete(ipb.CompleteRequest(model="gemma-3-270m", prompt="x"), timeout=30))
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_from_rpc(full.value).code is ErrorCode.QUEUE_FULL
        waiter.join(30)
        assert outcomes == [ErrorCode.TIMEOUT]
        first.cancel()  # the caller leaves: the node stops and the slot is free again

        done = list(
            stub.Complete(
                ipb.CompleteRequest(
                    model="gemma-3-270m", prompt="One, two,", params=ipb.SamplingParams(max_tokens=2)
                ),
                timeout=60,
            )
        )
        assert done[-1].finish_reason in (ipb.FINISH_REASON_STOP, ipb.FINISH_REASON_LENGTH)
