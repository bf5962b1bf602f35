"""The balancer's OpenAI-compatible HTTP door, driven by the official ``openai`` client and raw httpx.

A real `llmlb serve` process and a real `xllm serve` node answering from a shared dir that holds the
packaged models (gemma for text, whisper for speech-to-text, the Piper voice for text-to-speech).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from devkit.fake_hub import FakeHub
from devkit.model_files import ModelFiles
from tests.fixtures.eventually import eventually
from tests.fixtures.models import SENTENCE, assert_heard
from tests.integration.conftest import BalancerProcess, NodeProcess, wait_online

pytestmark = pytest.mark.slow
NodeFactory = Callable[..., NodeProcess]
GEMMA, WHISPER, PIPER = "gemma-3-270m", "whisper-base", "piper-en-us-joe-medium"


@pytest.fixture
def share(tmp_path: Path, gemma: ModelFiles, whisper: ModelFiles, piper: ModelFiles) -> Path:
    """A shared dir, ``<model-id>/<file>``, linking to the packaged models where they already are."""
    root = tmp_path / "share"
    for files in (gemma, whisper, piper):
        for filename, path in files.paths.items():
            link = root / files.model.id / filename
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return root


def client(balancer: BalancerProcess, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{balancer.http_url}/v1",
        api_key=balancer.admin_key if key is None else key,
        max_retries=0,  # a refusal must reach the test, not be retried away
        timeout=120,
    )


def api_key(balancer: BalancerProcess) -> str:
    reply = balancer.registry.CreateKey(rpb.CreateKeyRequest(name="app", scopes=[pb.SCOPE_API]), timeout=10)
    return str(reply.secret)


def admin(balancer: BalancerProcess) -> dict[str, str]:
    """The admin key's header; none when the balancer runs without keys."""
    return {"authorization": f"Bearer {balancer.admin_key}"} if balancer.admin_key else {}


def wait_ready(balancer: BalancerProcess, model_id: str, timeout: float = 10.0) -> dict[str, object]:
    """The model's /v1/models entry once a node reports it ready (heartbeats carry the state)."""
    headers = admin(balancer)
    last: dict[str, object] = {}

    def ready_entry() -> dict[str, object] | None:
        last.update(httpx.get(f"{balancer.http_url}/v1/models/{model_id}", headers=headers, timeout=5).json())
        return dict(last) if last.get("ready") else None

    return eventually(ready_entry, timeout, f"{model_id} ready", every=0.1, describe=lambda: str(last))


def metric(balancer: BalancerProcess, line_start: str) -> float:
    scrape = httpx.get(f"{balancer.http_url}/metrics", timeout=5).text
    for line in scrape.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def two_nodes_online(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub, node_factory: NodeFactory, share: Path
) -> tuple[BalancerProcess, list[NodeProcess]]:
    """A balancer and two nodes answering from ``share``, once both are online."""
    balancer = balancer_factory(hub)
    nodes = [node_factory(balancer, hub, "--shared-dir", str(share)) for _ in range(2)]
    for node in nodes:
        wait_online(balancer, node, within=15)
    return balancer, nodes


def test_the_openai_client_gets_every_capability_through_the_balancer(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub, node_factory: NodeFactory, share: Path
) -> None:
    balancer, nodes = two_nodes_online(balancer_factory, hub, node_factory, share)
    fleet = {n.node_id for n in nodes}
    listed_nodes = httpx.get(f"{balancer.http_url}/v0/nodes", headers=admin(balancer), timeout=5).json()[
        "data"
    ]
    assert {n["id"] for n in listed_nodes if n["state"] == "online"} == fleet
    oai = client(balancer)

    # Chat, whole and streamed: greedy decoding gives the same text both ways.
    asked: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello to the world."}]
    whole = oai.chat.completions.create(model=GEMMA, messages=asked, max_tokens=12, temperature=0)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert whole.model == GEMMA and whole.choices[0].message.role == "assistant"
    text = whole.choices[0].message.content or ""
    assert text.strip() and whole.choices[0].finish_reason in ("stop", "length")
    assert (
        whole.usage is not None and whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 12
    )
    chunks = list(
        oai.chat.completions.create(
            model=GEMMA,
            messages=asked,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1

    # Completions, whole and streamed.
    completion = oai.completions.create(
        model=GEMMA, prompt="One, two, three, four,", max_tokens=4, temperature=0
    )
    assert completion.object == "text_completion" and "five" in completion.choices[0].text.lower()
    streamed = oai.completions.create(
        model=GEMMA, prompt="One, two, three, four,", max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

    # Embeddings: the client asks for base64 by default; both encodings carry the same vectors.
    packed = oai.embeddings.create(model=GEMMA, input=["a cat", "a dog"])
    floats = oai.embeddings.create(model=GEMMA, input=["a cat", "a dog"], encoding_format="float")
    assert [d.index for d in packed.data] == [0, 1] and len(packed.data[0].embedding) > 100
    assert all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
        for x, y in zip(packed.data, floats.data, strict=True)
        for a, b in zip(x.embedding, y.embedding, strict=True)
    )
    assert packed.usage.prompt_tokens > 0

    # Speech, then the same audio transcribed back to the sentence.
    speech = oai.audio.speech.create(model=PIPER, voice="joe", input=SENTENCE, response_format="wav")
    audio = speech.content
    assert speech.response.headers["content-type"] == "audio/wav" and audio.startswith(b"RIFF")
    assert len(audio) > 20_000
    transcript = oai.audio.transcriptions.create(model=WHISPER, file=("speech.wav", audio))
    assert_heard(transcript.text, SENTENCE)  # Piper's voice varies a little from run to run
    srt = oai.audio.transcriptions.create(model=WHISPER, file=("speech.wav", audio), response_format="srt")
    assert "-->" in str(srt) and "fox" in str(srt).lower()
    verbose = oai.audio.transcriptions.create(
        model=WHISPER, file=("speech.wav", audio), response_format="verbose_json", language="en"
    )
    assert verbose.language == "en" and verbose.duration > 1 and verbose.segments
    pcm = oai.audio.speech.create(model=PIPER, voice="joe", input="Hello.", response_format="pcm")
    assert pcm.response.headers["content-type"] == "audio/pcm" and not pcm.content.startswith(b"RIFF")

    # Models: OpenAI's list, each entry with readiness per node.
    entry = wait_ready(balancer, GEMMA)
    per_node = entry["nodes"]
    assert isinstance(per_node, list) and {n["node_id"] for n in per_node} <= fleet
    assert any(n["ready"] for n in per_node)  # on whichever nodes the router sent gemma's requests
    served = oai.completions.with_raw_response.create(model=GEMMA, prompt="Hi", max_tokens=1)
    assert served.headers["x-llmlb-node"] in fleet
    listed = {m.id: m.to_dict() for m in oai.models.list()}
    assert set(listed) == {GEMMA, WHISPER, PIPER} and listed[GEMMA]["ready"] is True
    assert oai.models.retrieve(WHISPER).id == WHISPER
    deleted = oai.models.delete(WHISPER)
    assert (deleted.id, deleted.deleted) == (WHISPER, True)
    with pytest.raises(openai.NotFoundError) as gone:
        oai.models.retrieve(WHISPER)
    assert gone.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.audio.transcriptions.create(model=WHISPER, file=("speech.wav", audio))

    requests = 'llmlb_requests_total{code="ok",door="http",model="gemma-3-270m",route="chat"}'
    assert metric(balancer, requests) == 2.0
    assert metric(balancer, 'llmlb_tokens_total{kind="completion",model="gemma-3-270m"}') > 0


def test_an_admin_registers_a_model_over_http_and_reads_its_pinned_manifest(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub
) -> None:
    balancer = balancer_factory(hub)
    weights = b"GGUF" + bytes(range(256)) * 64
    commit = hub.add_repo("acme/tiny-GGUF", {"tiny-Q4_K_M.gguf": weights, "README.md": b"# tiny"})
    with httpx.Client(base_url=balancer.http_url, headers=admin(balancer), timeout=30) as http:
        created = http.post("/v0/models", json={"repo_id": "acme/tiny-GGUF", "tags": ["test"]})
        assert created.status_code == 201, created.text
        model = created.json()
        assert model["id"] == "acme/tiny-gguf" and model["revision"] == commit
        assert model["capabilities"] == ["chat", "completion", "embedding"] and model["ready"] is False
        manifest = http.get("/v0/models/registry/acme/tiny-gguf/manifest.json").json()
        assert manifest["repo"] == "acme/tiny-GGUF" and manifest["revision"] == commit
        assert manifest["files"] == [
            {
                "filename": "tiny-Q4_K_M.gguf",
                "format": "gguf",
                "size_bytes": len(weights),
                "sha256": hashlib.sha256(weights).hexdigest(),
                "backends": ["any"],
            }
        ]
        assert "acme/tiny-gguf" in {m["id"] for m in http.get("/v1/models").json()["data"]}
        missing = http.post("/v0/models", json={"repo_id": "acme/absent"})
        assert missing.status_code == 403 and missing.json()["error"]["code"] == "origin_unauthorized"


def test_refusals_reach_clients_in_openai_shape_with_the_right_status(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub
) -> None:
    balancer = balancer_factory(hub, LLMLB_MAX_BODY_MB="1")
    url = balancer.http_url
    api = {"authorization": f"Bearer {api_key(balancer)}"}

    def error(response: httpx.Response, status: int, code: str) -> None:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code and set(response.json()["error"]) == {
            "message",
            "type",
            "code",
            "param",
        }

    with httpx.Client(base_url=url, timeout=10) as http:
        error(http.get("/v1/models"), 401, "unauthorized")
        error(http.delete(f"/v1/models/{GEMMA}", headers=api), 403, "forbidden")
        error(http.post("/v0/models", headers=api, json={"repo_id": "org/x"}), 403, "forbidden")
        assert http.get("/v0/nodes", headers=api).status_code == 200  # reads need only the api scope
        error(http.post("/v1/chat/completions", headers=api, content=b"{oops"), 400, "invalid_request")
        error(http.post("/v1/chat/completions", headers=api, json={"model": GEMMA}), 400, "invalid_request")
        error(http.get("/v1/nowhere", headers=api), 404, "invalid_request")
        error(http.put("/v1/embeddings", headers=api), 405, "invalid_request")
        error(
            http.post("/v1/embeddings", headers=api, content=b"x" * (2 * 1024 * 1024)),
            413,
            "payload_too_large",
        )
        bad_id = {"model": "a/../b", "input": "x"}
        error(http.post("/v1/embeddings", headers=api, json=bad_id), 400, "invalid_model_id")
        no_node = http.post("/v1/embeddings", headers=api, json={"model": GEMMA, "input": "x"})
        error(no_node, 503, "no_capable_nodes")
        assert int(no_node.headers["retry-after"]) >= 1
        streamed = http.post(
            "/v1/chat/completions",
            headers=api,
            json={"model": "acme/none", "messages": [{"role": "user", "content": "x"}], "stream": True},
        )
        error(streamed, 404, "model_not_found")  # refused before the first chunk: JSON, not SSE
        error(
            http.post(
                "/v1/images/generations", headers=admin(balancer), json={"model": "acme/sd", "prompt": "x"}
            ),
            404,
            "model_not_found",
        )
        ready = http.get("/readyz").json()
        assert ready["status"] == "ready" and ready["models"] == 3
    with pytest.raises(openai.AuthenticationError) as refused:
        client(balancer, "llmlb-wrong").models.list()
    assert refused.value.code == "unauthorized"


@pytest.fixture
def gemma_share(tmp_path: Path, gemma: ModelFiles) -> Iterator[Path]:
    root = tmp_path / "gemma-share"
    for filename, path in gemma.paths.items():
        (root / GEMMA).mkdir(parents=True, exist_ok=True)
        (root / GEMMA / filename).symlink_to(path)
    yield root


def test_a_full_queue_is_429_and_a_client_leaving_mid_stream_stops_the_node(
    balancer_factory: Callable[..., BalancerProcess],
    hub: FakeHub,
    node_factory: NodeFactory,
    gemma_share: Path,
) -> None:
    # One request per node (one slot it reports, no allowance, and the cap until it reports), no queue:
    # a second request while one streams is refused at once.
    balancer = balancer_factory(
        hub, LLMLB_NODE_MAX_INFLIGHT="1", LLMLB_NODE_QUEUE_ALLOWANCE="0", LLMLB_QUEUE_SIZE="0"
    )
    node = node_factory(balancer, hub, "--shared-dir", str(gemma_share), XLLM_SLOTS_PER_MODEL="1")
    wait_online(balancer, node, within=15)
    headers = admin(balancer)
    long_story = {
        "model": GEMMA,
        "prompt": "Once upon a time",
        "max_tokens": 3000,
        "temperature": 0.8,
        "stream": True,
    }
    with httpx.Client(base_url=balancer.http_url, headers=headers, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=long_story) as story:
            assert story.status_code == 200 and story.headers["content-type"].startswith("text/event-stream")
            lines = story.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["object"] == "text_completion"

            busy = http.post("/v1/completions", json={**long_story, "stream": False, "max_tokens": 2})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
            assert int(busy.headers["retry-after"]) >= 1
        # The stream is closed after one event: the node must stop, not write 3000 tokens to nobody.
        left_at = time.monotonic()

    cancelled = 'llmlb_requests_total{code="cancelled",door="http",model="gemma-3-270m",route="complete"}'
    eventually(lambda: metric(balancer, cancelled) >= 1, 10, "the shim seeing the client leave", every=0.1)
    # The node's slot is free again well before 3000 tokens could have been generated (~45 tokens/s).
    with httpx.Client(base_url=balancer.http_url, headers=headers, timeout=120) as http:

        def answered() -> bool:
            again = http.post(
                "/v1/completions", json={"model": GEMMA, "prompt": "One, two,", "max_tokens": 2}
            )
            assert again.status_code in (200, 429), again.text
            return again.status_code == 200

        eventually(answered, left_at + 10 - time.monotonic(), "the node's slot free again", every=0.2)
    assert time.monotonic() - left_at < 10


def test_speech_and_wav_bytes_stream_as_they_are_made(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub, node_factory: NodeFactory, share: Path
) -> None:
    balancer = balancer_factory(hub)
    wait_online(balancer, node_factory(balancer, hub, "--shared-dir", str(share)), within=15)
    text = " ".join([SENTENCE] * 3)
    with (
        httpx.Client(base_url=balancer.http_url, timeout=120) as http,
        http.stream(
            "POST",
            "/v1/audio/speech",
            headers=admin(balancer),
            json={"model": PIPER, "input": text, "voice": "joe"},
        ) as spoken,
    ):
        assert spoken.status_code == 200 and spoken.headers["content-type"] == "audio/wav"
        pieces = list(spoken.iter_raw())
    audio = b"".join(pieces)
    assert len(pieces) > 1 and audio.startswith(b"RIFF")  # one piece per sentence, not one blob
    with wave.open(io.BytesIO(fixed_sizes(audio))) as wav:
        assert wav.getsampwidth() == 2 and wav.getnframes() / wav.getframerate() > 3


def fixed_sizes(audio: bytes) -> bytes:
    """A streamed WAV with its 'unknown length' header sizes set, so ``wave`` reads it."""
    header = bytearray(audio[:44])
    struct.pack_into("<I", header, 4, len(audio) - 8)
    struct.pack_into("<I", header, 40, len(audio) - 44)
    return bytes(header) + audio[44:]


def test_a_conversations_later_turn_is_answered_from_its_nodes_prefix_cache_on_both_doors(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub, node_factory: NodeFactory, share: Path
) -> None:
    balancer, _nodes = two_nodes_online(balancer_factory, hub, node_factory, share)
    oai = client(balancer)
    system = "You are the help desk of a bicycle shop. " + " ".join(
        f"Rule {i}: answer questions about part number {i} politely and briefly." for i in range(12)
    )
    history: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Do you sell bells?"},
    ]
    first = oai.chat.completions.with_raw_response.create(
        model=GEMMA, messages=history, max_tokens=6, temperature=0
    )
    answer = first.parse()
    assert answer.usage is not None and answer.usage.prompt_tokens > 128
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 0  # nothing computed before
    history += [
        {"role": "assistant", "content": answer.choices[0].message.content or ""},
        {"role": "user", "content": "And lights?"},
    ]
    second = oai.chat.completions.with_raw_response.create(
        model=GEMMA, messages=history, max_tokens=6, temperature=0
    )
    again = second.parse()
    assert second.headers["x-llmlb-node"] == first.headers["x-llmlb-node"]  # back where its prefix is
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert (again.usage.prompt_tokens_details.cached_tokens or 0) >= 128  # the system prompt, in whole blocks

    # The gRPC door: the same conversation, one turn further, reports its cached tokens the same way.
    request = ipb.ChatRequest(
        model=GEMMA,
        messages=[ipb.ChatMessage(role=str(m["role"]), content=str(m.get("content", ""))) for m in history],
        params=ipb.SamplingParams(max_tokens=4, temperature=0),
        prompt_cache_key="bicycle-desk",
    )
    assert balancer.channel is not None
    chunks = list(igrpc.InferenceStub(balancer.channel).Chat(request, timeout=120))
    usage = chunks[-1].usage
    assert usage.prompt_tokens > usage.cached_tokens >= 128
    cached = 'llmlb_prompt_tokens_total{model="gemma-3-270m",node="%s",source="cached"}'
    assert metric(balancer, cached % first.headers["x-llmlb-node"]) >= 256
