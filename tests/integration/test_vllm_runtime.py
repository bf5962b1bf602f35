"""vLLM as the node's child process, against a stand-in speaking its HTTP API (no GPU here).

The runtime is built as the pool builds it, with ``XLLM_VLLM_COMMAND`` naming the stand-in
(``tests/fixtures/fake_vllm.py``), so the process handling, health check, proxying, cache readings and
restarts are the real code's.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import ErrorCode, LlmlbError
from common.formats import backends_for, classify
from common.inference import ChatMessage, ChatRequest, CompleteRequest, FinishReason, SamplingParams
from common.types import Capability, ManifestFile, Model, ModelSource
from node.runtimes.base import LoadContext, RuntimeSettings
from node.runtimes.engines import Engines
from node.runtimes.vllm import VllmRuntime
from tests.fixtures.eventually import eventually

ROOT = Path(__file__).resolve().parents[2]
STAND_IN = f"{sys.executable} {ROOT / 'tests' / 'fixtures' / 'fake_vllm.py'}"


def safetensors_model(folder: Path, model_id: str = "tiny-st") -> tuple[Model, dict[str, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    names = ["config.json", "model.safetensors"]
    model = Model(
        id=model_id,
        name=model_id,
        source=ModelSource.HF,
        repo_id=f"org/{model_id}",
        revision="",
        origin="",
        files=[ManifestFile(n, classify(n), 64, backends=backends_for(classify(n))) for n in names],
        capabilities=[Capability.CHAT, Capability.COMPLETION],
    )
    return model, {n: folder / n for n in names}


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[VllmRuntime]:
    model, paths = safetensors_model(tmp_path / "tiny-st")
    settings = RuntimeSettings(vllm_command=STAND_IN)
    spec = Engines.default(settings).select(model, Capability.CHAT)
    created = spec.create(LoadContext(model, paths, settings))
    assert isinstance(created, VllmRuntime)
    created.load()
    yield created
    created.unload()


def chat(text: str, max_tokens: int | None = None) -> ChatRequest:
    params = SamplingParams(max_tokens=max_tokens)
    return ChatRequest(model="tiny-st", messages=(ChatMessage("user", text),), params=params)


def test_a_configured_command_makes_vllm_serve_safetensors_and_transformers_otherwise() -> None:
    assert "vllm" in Engines.default(RuntimeSettings(vllm_command=STAND_IN)).names
    assert "vllm" not in Engines.default(RuntimeSettings()).names  # CPU node, no command: transformers


def test_chat_streams_the_servers_answer_with_usage(runtime: VllmRuntime) -> None:
    chunks = list(runtime.chat(chat("red green blue", max_tokens=4), threading.Event()))
    assert "".join(c.delta for c in chunks) == " red green blue red"
    assert len([c for c in chunks if c.delta]) == 4  # streamed piece by piece
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 4)


def test_completion_honours_stop_sequences_and_several_choices(runtime: VllmRuntime) -> None:
    request = CompleteRequest(
        model="tiny-st", prompt="one two three", params=SamplingParams(stop=(" three",), n=2)
    )
    chunks = list(runtime.complete(request, threading.Event()))
    for index in (0, 1):
        assert "".join(c.delta for c in chunks if c.index == index) == " one two"
        assert [c.finish_reason for c in chunks if c.index == index and c.finish_reason] == [
            FinishReason.STOP
        ]
    # Usage on the last chunk only: both choices' tokens, the one holding the stop sequence included.
    assert [c.usage for c in chunks if c.usage] == [chunks[-1].usage]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_a_cancelled_stream_stops_early_and_the_cache_use_is_read_while_it_runs(runtime: VllmRuntime) -> None:
    cancel = threading.Event()
    seen: list[str] = []
    readings: list[float] = []
    for chunk in runtime.chat(chat("say this slowly please", max_tokens=60), cancel):
        seen.append(chunk.delta)
        if len(seen) == 5:
            eventually(lambda: (runtime.kv_cache_usage or 0) > 0, within=10, what="a cache reading")
            readings.append(runtime.kv_cache_usage or 0)
            cancel.set()
    assert readings and readings[0] > 0
    assert chunks_before_end(seen) < 60
    eventually(lambda: runtime.kv_cache_usage == 0, within=10, what="the cache emptied after the cancel")


def chunks_before_end(seen: list[str]) -> int:
    return len([s for s in seen if s])


def test_a_server_that_dies_is_restarted_and_answers_again(runtime: VllmRuntime) -> None:
    first = runtime.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    eventually(
        lambda: runtime.pid not in (None, first) and runtime.health() is None, within=30, what="a restart"
    )
    chunks = list(runtime.chat(chat("again", max_tokens=1), threading.Event()))
    assert "".join(c.delta for c in chunks) == " again"


def test_unloading_stops_the_server(runtime: VllmRuntime) -> None:
    pid = runtime.pid
    assert pid is not None
    runtime.unload()
    assert runtime.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(LlmlbError) as caught:
        list(runtime.chat(chat("hello"), threading.Event()))
    assert caught.value.code is ErrorCode.UNAVAILABLE


def test_a_server_that_cannot_start_fails_the_load_with_its_output(tmp_path: Path) -> None:
    model, paths = safetensors_model(tmp_path / "broken")
    paths["config.json"].unlink()  # the stand-in, like vLLM, refuses a folder without its config
    paths = {
        "model.safetensors": paths["model.safetensors"],
        "config.json": tmp_path / "elsewhere" / "config.json",
    }
    (tmp_path / "elsewhere").mkdir()
    created = VllmRuntime(LoadContext(model, paths, RuntimeSettings(vllm_command=STAND_IN)))
    with pytest.raises(LlmlbError) as caught:
        created.load()
    created.unload()
    assert caught.value.code is ErrorCode.INTERNAL
    assert "no config.json" in caught.value.message
