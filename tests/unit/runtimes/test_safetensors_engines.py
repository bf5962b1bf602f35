"""Which engine serves a safetensors model on a node, what the node reports it runs, and the rules of
the transformers runtime that need no model: its memory estimate and its nucleus sampling."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from common.errors import ErrorCode, LlmlbError
from common.formats import backends_for, classify
from common.types import Backend, Capability, FileFormat, ManifestFile, Model, ModelSource
from node.runtimes import transformers as tf
from node.runtimes.base import LoadContext, RuntimeSettings
from node.runtimes.engines import Engines
from node.runtimes.hf_folder import model_folder
from node.runtimes.vllm import kv_cache_usage


def model(files: list[str]) -> Model:
    return Model(
        id="m",
        name="m",
        source=ModelSource.HF,
        repo_id="org/m",
        revision="",
        origin="",
        files=[ManifestFile(f, classify(f), 1, backends=backends_for(classify(f))) for f in files],
        capabilities=[Capability.CHAT, Capability.COMPLETION],
    )


ST = ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_cpu_node_serves_safetensors_chat_with_transformers_and_reports_the_format() -> None:
    engines = Engines.default(RuntimeSettings(backend=Backend.CPU))
    assert engines.select(model(ST), Capability.CHAT).engine == "transformers"
    assert FileFormat.SAFETENSORS in engines.formats and FileFormat.GGUF in engines.formats


def test_a_cuda_node_without_vllm_falls_back_to_transformers() -> None:
    engines = Engines.default(RuntimeSettings(backend=Backend.CUDA))
    assert engines.select(model(ST), Capability.CHAT).engine == "transformers"  # vllm is not installed here


def test_a_configured_vllm_command_wins_for_chat_and_transformers_keeps_embeddings() -> None:
    engines = Engines.default(RuntimeSettings(vllm_command="serve-it"))
    m = model(ST)
    m.capabilities.append(Capability.EMBEDDING)
    assert engines.select(m, Capability.CHAT).engine == "vllm"
    assert engines.select(m, Capability.EMBEDDING).engine == "transformers"


def test_a_node_without_pytorch_neither_offers_nor_reports_transformers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "torch" else real(name))
    engines = Engines.default(RuntimeSettings())
    assert "transformers" not in engines.names
    with pytest.raises(LlmlbError) as caught:
        engines.select(model(ST), Capability.CHAT)
    assert caught.value.code is ErrorCode.NO_CAPABLE_NODES


def test_the_memory_estimate_scales_the_weights_to_the_load_dtype_plus_a_margin(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"dtype": "bfloat16"}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * (100 * 1024 * 1024))
    m = model(["config.json", "model.safetensors"])
    paths = {n: tmp_path / n for n in ("config.json", "model.safetensors")}
    cpu = tf.TransformersRuntime(LoadContext(m, paths, RuntimeSettings(backend=Backend.CPU)))
    metal = tf.TransformersRuntime(LoadContext(m, paths, RuntimeSettings(backend=Backend.METAL)))
    # bfloat16 on disk: float32 on the CPU takes twice the file, float16 on Metal the same.
    assert cpu.memory_mb == 200 * 1.2 + tf.MEMORY_MARGIN_MB
    assert metal.memory_mb == 100 * 1.2 + tf.MEMORY_MARGIN_MB


def test_temperature_zero_is_greedy_and_top_p_keeps_only_the_likeliest_mass() -> None:
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    generator = torch.Generator().manual_seed(1)
    assert tf._pick(logits, 0.0, 1.0, generator) == 1
    # The top two hold nearly all the mass: top_p 0.5 keeps only the first, whatever the draw.
    assert {tf._pick(logits, 1.0, 0.5, generator) for _ in range(50)} == {1}
    assert {tf._pick(logits, 1.0, 0.99, generator) for _ in range(200)} == {1, 2}


def test_the_kv_cache_use_is_read_from_either_vllm_gauge() -> None:
    page = (
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.125\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
        "vllm:num_requests_running 3.0\n"
    )
    assert kv_cache_usage(page) == 0.5
    assert kv_cache_usage("vllm:num_requests_running 1.0\n") is None


def test_a_models_files_found_in_two_places_are_read_from_one_folder(tmp_path: Path) -> None:
    local, shared = tmp_path / "models" / "m", tmp_path / "shared" / "m"
    (local / "tokenizer").mkdir(parents=True)
    shared.mkdir(parents=True)
    (shared / "config.json").write_text("{}")
    (shared / "model.safetensors").write_bytes(b"w")
    (local / "tokenizer" / "tokenizer.json").write_text("{}")
    together = {n: shared / n for n in ("config.json", "model.safetensors")}
    assert model_folder(together, "m") == shared  # all in one place: read in place

    split = {**together, "tokenizer/tokenizer.json": local / "tokenizer" / "tokenizer.json"}
    folder = model_folder(split, "m")
    assert folder not in (local, shared)
    assert (folder / "config.json").read_text() == "{}"
    assert (folder / "tokenizer" / "tokenizer.json").resolve() == (
        local / "tokenizer" / "tokenizer.json"
    ).resolve()
