"""Which engine, device and offload each backend gets: the CUDA and Metal paths, checked without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ErrorCode, LlmlbError
from common.formats import backends_for, classify
from common.types import Backend, Capability, ManifestFile, Model, ModelSource
from node.hardware import detect
from node.pool import PoolSettings
from node.resolver import needed_files
from node.runtimes.engines import Engines
from node.runtimes.llama import gpu_layers_for
from node.runtimes.piper import execution_providers
from node.runtimes.whisper import device_for
from tests.unit.runtimes.test_hardware import NO_DRIVER, TWO_GPUS

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_BUILD = ["AzureExecutionProvider", "CPUExecutionProvider"]
MAC_BUILD = ["CoreMLExecutionProvider", "CPUExecutionProvider"]


def model(files: list[str], capabilities: list[Capability], model_id: str = "m") -> Model:
    return Model(
        id=model_id,
        name=model_id,
        source=ModelSource.HF,
        repo_id="org/m",
        revision="",
        origin="",
        files=[ManifestFile(f, classify(f), 1, backends=backends_for(classify(f))) for f in files],
        capabilities=capabilities,
    )


@pytest.mark.parametrize(
    ("backend", "configured", "expected"),
    [
        (Backend.CUDA, None, -1),  # every layer on the GPU
        (Backend.METAL, None, -1),
        (Backend.CUDA, 20, 20),  # an operator's limit is kept
        (Backend.CPU, None, 0),
        (Backend.CPU, 20, 0),  # nothing to offload to
    ],
)
def test_gpu_layers_follow_the_backend(backend: Backend, configured: int | None, expected: int) -> None:
    assert gpu_layers_for(backend, configured) == expected


def test_detected_cuda_machine_offloads_every_llama_layer() -> None:
    assert gpu_layers_for(detect(nvml=TWO_GPUS, system="Linux", machine="x86_64").backend, None) == -1
    assert gpu_layers_for(detect(nvml=NO_DRIVER, system="Linux", machine="x86_64").backend, None) == 0


def test_onnx_on_cuda_uses_the_cuda_provider_with_cpu_fallback() -> None:
    assert execution_providers(Backend.CUDA, GPU_BUILD) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_onnx_on_cuda_without_the_gpu_build_falls_back_to_cpu() -> None:
    assert execution_providers(Backend.CUDA, CPU_BUILD) == ["CPUExecutionProvider"]


def test_onnx_on_metal_uses_coreml() -> None:
    assert execution_providers(Backend.METAL, MAC_BUILD) == [
        "CoreMLExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_onnx_on_cpu_uses_only_the_cpu_provider_even_on_a_gpu_build() -> None:
    assert execution_providers(Backend.CPU, GPU_BUILD) == ["CPUExecutionProvider"]


def test_whisper_device_by_backend() -> None:
    assert device_for(Backend.CUDA) == ("cuda", "float16")
    assert device_for(Backend.CPU) == ("cpu", "int8")
    assert device_for(Backend.METAL) == ("cpu", "int8")  # CTranslate2 has no Metal device


def test_memory_budget_defaults_to_gpu_memory_on_cuda_and_ram_elsewhere() -> None:
    cuda = detect(nvml=TWO_GPUS, system="Linux", machine="x86_64")
    cpu = detect(nvml=NO_DRIVER, system="Linux", machine="x86_64")
    assert PoolSettings().budget_mb(cuda) == (81559 + 23034) * 9 // 10
    assert PoolSettings().budget_mb(cpu) == max(1024, cpu.memory_total_mb * 3 // 4)
    assert PoolSettings(memory_budget_mb=500).budget_mb(cuda) == 500


def test_pool_settings_from_environment() -> None:
    settings = PoolSettings.from_env(
        {"XLLM_MEMORY_BUDGET_MB": "2048", "XLLM_SLOTS_PER_MODEL": "3", "XLLM_GPU_LAYERS": "12"}
    )
    assert (settings.memory_budget_mb, settings.slots_per_model, settings.gpu_layers) == (2048, 3, 12)
    assert PoolSettings.from_env({}) == PoolSettings()
    with pytest.raises(ValueError, match="XLLM_SLOTS_PER_MODEL"):
        PoolSettings.from_env({"XLLM_SLOTS_PER_MODEL": "0"})
    with pytest.raises(ValueError, match="whole number"):
        PoolSettings.from_env({"XLLM_MEMORY_BUDGET_MB": "lots"})


@pytest.mark.parametrize(
    ("files", "capability", "engine"),
    [
        (["m.gguf"], Capability.CHAT, "llama.cpp"),
        (["m.gguf"], Capability.EMBEDDING, "llama.cpp"),
        (["config.json", "model.bin", "vocabulary.txt"], Capability.TRANSCRIPTION, "faster-whisper"),
        (["v.onnx", "v.onnx.json"], Capability.SPEECH, "onnxruntime"),
        (["sd-v1-5.safetensors"], Capability.IMAGE, "stable-diffusion.cpp"),
        (["sd-turbo.gguf"], Capability.IMAGE, "stable-diffusion.cpp"),  # a GGUF that draws, not chats
    ],
)
def test_the_engine_is_picked_by_files_and_capability(
    files: list[str], capability: Capability, engine: str
) -> None:
    assert Engines.default().select(model(files, [capability]), capability).engine == engine


def test_a_model_without_the_capability_is_model_not_found() -> None:
    with pytest.raises(LlmlbError) as caught:
        Engines.default().select(model(["v.onnx"], [Capability.SPEECH], "voice"), Capability.CHAT)
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND
    assert "does not support chat" in caught.value.message and "speech" in caught.value.message


def test_files_no_engine_loads_are_no_capable_nodes() -> None:
    with pytest.raises(LlmlbError) as caught:
        Engines.default().select(model(["weights.onnx"], [Capability.CHAT]), Capability.CHAT)
    assert caught.value.code is ErrorCode.NO_CAPABLE_NODES


def test_every_engine_module_builds_without_its_library_touched(tmp_path: Path) -> None:
    # Specs are importable even where an engine library is missing: it is only imported at load.
    assert Engines.default().names == [
        "llama.cpp",
        "transformers",  # vLLM only where it is installed on CUDA, or its command is configured
        "faster-whisper",
        "onnxruntime",
        "stable-diffusion.cpp",
    ]


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        (Backend.CPU, {"model.safetensors", "config.json"}),
        (Backend.CUDA, {"model.safetensors", "config.json"}),
        (Backend.METAL, {"model.safetensors", "config.json", "model.metal.bin"}),
    ],
)
def test_a_node_needs_the_metal_file_only_on_metal(backend: Backend, expected: set[str]) -> None:
    m = model(["model.safetensors", "config.json", "model.metal.bin"], [Capability.CHAT])
    assert {f.filename for f in needed_files(m, backend)} == expected


def test_a_node_batches_four_streams_per_model_unless_told_otherwise() -> None:
    default = PoolSettings.from_env({})
    assert (default.slots_per_model, default.batching, default.batch_exact) == (4, True, False)
    legacy = PoolSettings.from_env({"XLLM_BATCHING": "0", "XLLM_BATCH_EXACT": "1"})
    assert (legacy.batching, legacy.batch_exact) == (False, True)
    with pytest.raises(ValueError, match="XLLM_BATCHING"):
        PoolSettings.from_env({"XLLM_BATCHING": "yes"})
