"""Safetensors models answer through both doors (the official ``openai`` client over HTTP, the stubs over
gRPC), streamed and not, from a real balancer and node on 127.0.0.1.

Two fleets: a CPU node serving the real gemma safetensors copy with transformers, and a node whose
``XLLM_VLLM_COMMAND`` names the vLLM stand-in (``tests/fixtures/fake_vllm.py``), so the node starts,
proxies and stops a vLLM-speaking child exactly as it would vLLM on a CUDA node. Each model is in the
balancer's catalogue (``LLMLB_CATALOG``) with its files' sha256, and in the node's shared dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from common.pb.llmlb.v1 import inference_pb2 as ipb
from common.pb.llmlb.v1 import inference_pb2_grpc as igrpc
from devkit.fake_hub import FakeHub
from devkit.model_files import ModelFiles
from devkit.safetensors_copy import catalogue_entry
from tests.conftest import hermetic
from tests.integration.conftest import BalancerProcess, NodeProcess, sync_channel, wait_online

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STAND_IN = f"{sys.executable} {ROOT / 'tests' / 'fixtures' / 'fake_vllm.py'}"
GEMMA_ST = "gemma-3-270m-safetensors"
TINY = "tiny-vllm"


@contextlib.contextmanager
def fleet(
    root: Path, entry: dict[str, Any], files: dict[str, Path], node_env: dict[str, str]
) -> Iterator[BalancerProcess]:
    """A balancer whose catalogue holds ``entry`` and one node finding its ``files`` in a shared dir."""
    shared = root / "shared" / str(entry["id"])
    shared.mkdir(parents=True)
    for name, path in files.items():
        (shared / name).symlink_to(path)
    catalogue = root / "catalogue.json"
    catalogue.write_text(json.dumps({"models": [entry]}))
    with pytest.MonkeyPatch.context() as env, FakeHub() as hub:
        hermetic(env, root / "home")  # module-scoped: made alike here (both fleets live at once)
        balancer = BalancerProcess(
            root / "balancer", {"HF_ENDPOINT": hub.url, "LLMLB_CATALOG": str(catalogue)}
        )
        balancer.start()
        node = NodeProcess(
            root / "node",
            balancer.address,
            {"HF_ENDPOINT": hub.url, **balancer.node_env(), **node_env},
            ["--shared-dir", str(root / "shared")],
        )
        try:
            node.start()
            wait_online(balancer, node)
            yield balancer
        finally:
            node.stop()
            balancer.stop()


def client(balancer: BalancerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{balancer.http_url}/v1", api_key=balancer.admin_key, max_retries=0, timeout=300
    )


def grpc_text(balancer: BalancerProcess, call: str, request: Any) -> tuple[str, list[Any]]:
    with sync_channel(balancer.address, balancer.admin_key) as channel:
        chunks = list(getattr(igrpc.InferenceStub(channel), call)(request, timeout=300))
    return "".join(c.delta for c in chunks), chunks


def streamed_chat(oai: openai.OpenAI, model: str, content: str, **kw: Any) -> tuple[str, Any]:
    stream = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    )
    text, usage = "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
    return text, usage


# -- vLLM (the stand-in) behind the node ------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BalancerProcess]:
    root = tmp_path_factory.mktemp("vllm")
    folder = root / "weights"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    files = {p.name: p for p in folder.iterdir()}
    entry = {
        "id": TINY,
        "name": TINY,
        "source": "hf",
        "repo_id": f"local/{TINY}",
        "artifacts": [
            {
                "filename": n,
                "size_bytes": p.stat().st_size,
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            }
            for n, p in sorted(files.items())
        ],
        "capabilities": ["chat", "completion"],
    }
    with fleet(root, entry, files, {"XLLM_VLLM_COMMAND": STAND_IN}) as balancer:
        yield balancer


def test_vllm_answers_chat_and_completions_through_the_http_door(vllm_fleet: BalancerProcess) -> None:
    oai = client(vllm_fleet)
    whole = oai.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "red green blue"}], max_tokens=4
    )
    assert whole.choices[0].message.content == " red green blue red"
    assert whole.usage is not None and (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (3, 4)
    text, usage = streamed_chat(oai, TINY, "red green blue", max_tokens=4)
    assert text == " red green blue red" and usage is not None and usage.completion_tokens == 4
    done = oai.completions.create(model=TINY, prompt="one two three", max_tokens=5, stop=[" three"])
    assert done.choices[0].text == " one two" and done.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in oai.completions.create(model=TINY, prompt="one two", max_tokens=3, stream=True)
        if c.choices
    )
    assert streamed == " one two one"


def test_vllm_answers_chat_and_completions_through_the_grpc_door(vllm_fleet: BalancerProcess) -> None:
    params = ipb.SamplingParams(max_tokens=3)
    text, chunks = grpc_text(
        vllm_fleet,
        "Chat",
        ipb.ChatRequest(model=TINY, messages=[ipb.ChatMessage(role="user", content="a b")], params=params),
    )
    assert text == " a b a" and chunks[-1].usage.completion_tokens == 3
    text, _ = grpc_text(vllm_fleet, "Complete", ipb.CompleteRequest(model=TINY, prompt="x y", params=params))
    assert text == " x y x"


# -- transformers on the real checkpoint ------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_fleet(
    gemma_safetensors: ModelFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BalancerProcess]:
    folder = next(iter(gemma_safetensors.paths.values())).parent
    entry = catalogue_entry(folder, GEMMA_ST)
    with fleet(tmp_path_factory.mktemp("gemma-st"), entry, dict(gemma_safetensors.paths), {}) as balancer:
        yield balancer


def test_the_safetensors_gemma_answers_through_both_doors_streamed_and_not(
    gemma_fleet: BalancerProcess,
) -> None:
    oai = client(gemma_fleet)
    prompt = "One, two, three, four,"
    whole = oai.completions.create(model=GEMMA_ST, prompt=prompt, max_tokens=3, temperature=0)
    assert whole.choices[0].text.strip().startswith("five")
    assert whole.usage is not None and whole.usage.completion_tokens == 3
    streamed = "".join(
        c.choices[0].text
        for c in oai.completions.create(
            model=GEMMA_ST, prompt=prompt, max_tokens=3, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == whole.choices[0].text  # greedy: the same answer either way
    chat = oai.chat.completions.create(
        model=GEMMA_ST, messages=[{"role": "user", "content": "Say hi."}], max_tokens=3, temperature=0
    )
    assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens <= 3
    text, usage = streamed_chat(oai, GEMMA_ST, "Say hi.", max_tokens=3, temperature=0)
    assert text == chat.choices[0].message.content and usage is not None

    params = ipb.SamplingParams(max_tokens=3, temperature=0.0)
    text, chunks = grpc_text(
        gemma_fleet, "Complete", ipb.CompleteRequest(model=GEMMA_ST, prompt=prompt, params=params)
    )
    assert text == whole.choices[0].text and chunks[-1].usage.completion_tokens == 3
    message = ipb.ChatMessage(role="user", content="Say hi.")
    text, _ = grpc_text(
        gemma_fleet, "Chat", ipb.ChatRequest(model=GEMMA_ST, messages=[message], params=params)
    )
    assert text == chat.choices[0].message.content
