"""The llama.cpp runtime's own logic without an engine: chat-template choice, GGUF headers, stop handling."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from common.errors import ErrorCode, LlmlbError
from common.inference import FinishReason, SamplingParams
from common.types import Backend, Capability, FileFormat, ManifestFile, Model, ModelSource
from node.runtimes.base import LoadContext, RuntimeSettings
from node.runtimes.gguf import kv_cache_mb, read_gguf_metadata
from node.runtimes.llama import LlamaRuntime, generate_text

OWN = "{% for m in messages %}<own>{{ m.content }}</own>{% endfor %}"
CATALOGUE = "{% for m in messages %}<catalogue>{{ m.content }}{% endfor %}"


def _gguf_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def write_gguf_header(path: Path, values: dict[str, str | int]) -> Path:
    """A GGUF v3 file with metadata and no tensors: enough for everything that reads the header."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(values) + 1)
    # A string array first, as real files carry their vocabulary: the reader must skip it.
    out += _gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2)
    out += _gguf_string("<pad>") + _gguf_string("<eos>")
    for key, value in values.items():
        out += _gguf_string(key)
        if isinstance(value, str):
            out += struct.pack("<I", 8) + _gguf_string(value)
        else:
            out += struct.pack("<II", 4, value)
    path.write_bytes(out)
    return path


def runtime_for(path: Path, fallback: str = "", backend: Backend = Backend.CPU) -> LlamaRuntime:
    files = [ManifestFile(path.name, FileFormat.GGUF, path.stat().st_size, "")]
    model = Model(
        "acme/tiny",
        "tiny",
        ModelSource.HF,
        "acme/tiny",
        "abc",
        "",
        files=files,
        capabilities=[Capability.CHAT],
        chat_template=fallback,
    )
    return LlamaRuntime(LoadContext(model, {path.name: path}, RuntimeSettings(backend=backend)))


def test_the_ggufs_own_chat_template_comes_before_the_catalogues(tmp_path: Path) -> None:
    own = write_gguf_header(tmp_path / "own.gguf", {"tokenizer.chat_template": OWN, "llama.block_count": 2})
    assert read_gguf_metadata(own)["llama.block_count"] == 2  # read past the vocabulary array
    assert runtime_for(own, CATALOGUE).chat_template() == OWN
    bare = write_gguf_header(tmp_path / "bare.gguf", {"general.architecture": "llama"})
    assert runtime_for(bare, CATALOGUE).chat_template() == CATALOGUE
    with pytest.raises(LlmlbError) as caught:
        runtime_for(bare, "").chat_template()
    assert caught.value.code is ErrorCode.INVALID_REQUEST and "no chat template" in caught.value.message


class ScriptedLlama:
    """Stands in for ``llama_cpp.Llama``: yields the token ids it was given, each one character."""

    EOG = 0

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces  # token id i + 1 decodes to pieces[i]; id 0 ends generation
        self._model = type("Model", (), {"vocab": None})()

    def n_ctx(self) -> int:
        return 64

    def set_seed(self, seed: int) -> None:
        pass

    def generate(self, prompt: list[int], **kwargs: Any) -> Iterator[int]:
        yield from range(1, len(self.pieces) + 1)
        yield self.EOG

    def detokenize(self, tokens: list[int]) -> bytes:
        return "".join(self.pieces[t - 1] for t in tokens).encode("utf-8")


@pytest.fixture
def eog_is_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_vocab_is_eog", lambda vocab, token: token == ScriptedLlama.EOG)


def run(pieces: list[str], stop: tuple[str, ...]) -> tuple[str, FinishReason | None]:
    llm: Any = ScriptedLlama(pieces)
    chunks = list(generate_text(llm, [1], SamplingParams(max_tokens=20, stop=stop), threading.Event()))
    return "".join(c.delta for c in chunks), chunks[-1].finish_reason


@pytest.mark.usefixtures("eog_is_zero")
def test_text_held_back_for_a_possible_stop_is_kept_when_generation_ends() -> None:
    # "\n" might have begun "\n\n", so it was held back; the model then ended: it is part of the answer.
    assert run(["Hi", "\n"], ("\n\n",)) == ("Hi\n", FinishReason.STOP)
    assert run(["Hi", "\n", "\n", "more"], ("\n\n",)) == ("Hi", FinishReason.STOP)  # a real stop cuts
    assert run(["Hé", "llo"], ()) == ("Héllo", FinishReason.STOP)


def test_a_gpu_node_whose_llama_cpp_cannot_offload_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llama_cpp

    path = write_gguf_header(tmp_path / "m.gguf", {"general.architecture": "llama"})
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    for backend, warned in ((Backend.CUDA, True), (Backend.METAL, True), (Backend.CPU, False)):
        with structlog.testing.capture_logs() as logs:
            runtime_for(path, backend=backend)
        assert any(e["event"] == "llama_cpp.cpu_only_build" for e in logs) is warned, backend
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    with structlog.testing.capture_logs() as logs:
        runtime_for(path, backend=Backend.CUDA)
    assert not logs


def test_batching_keeps_one_copy_of_the_weights_whatever_the_slot_count(tmp_path: Path) -> None:
    header: dict[str, str | int] = {
        "general.architecture": "llama",
        "llama.block_count": 18,
        "llama.embedding_length": 640,
    }
    path = write_gguf_header(tmp_path / "tiny.gguf", header)

    def estimate(slots: int, batching: bool) -> int:
        files = [ManifestFile(path.name, FileFormat.GGUF, path.stat().st_size, "")]
        model = Model("acme/tiny", "tiny", ModelSource.HF, "acme/tiny", "abc", "", files=files)
        settings = RuntimeSettings(slots=slots, batching=batching, prefix_cache_mb=0)
        return LlamaRuntime(LoadContext(model, {path.name: path}, settings)).memory_mb

    kv = kv_cache_mb(read_gguf_metadata(path), 4096)
    # Batched: each further slot adds its KV cache only; one context per slot also adds compute buffers.
    assert estimate(8, True) - estimate(1, True) == pytest.approx(7 * kv, abs=1)
    assert estimate(8, False) - estimate(1, False) > estimate(8, True) - estimate(1, True)
