"""A catalogue model's need: its weight format, the bytes a node fetches, the backends it has files for."""

from __future__ import annotations

from balancer.scheduler import ModelNeed
from common.types import Backend, FileFormat, ManifestFile, Model, ModelSource


def model(*files: ManifestFile, required_mb: int = 0) -> Model:
    return Model(
        "org/m",
        "M",
        ModelSource.HF,
        "org/m",
        "abc",
        "https://huggingface.co",
        list(files),
        required_vram_mb=required_mb,
    )


def test_a_gguf_model_needs_its_files_and_runs_on_every_backend() -> None:
    need = ModelNeed.of(
        model(
            ManifestFile("m.gguf", FileFormat.GGUF, 4_000),
            ManifestFile("c.json", FileFormat.CONFIG, 10),
            required_mb=900,
        )
    )
    assert need == ModelNeed("org/m", FileFormat.GGUF, 4_010, 900, frozenset({Backend.ANY}))
    assert need.runs_on(Backend.CUDA) and need.runs_on(Backend.CPU)


def test_metal_only_weights_run_only_on_metal_and_metal_files_beside_a_gguf_are_not_fetched_by_others() -> (
    None
):
    metal = ManifestFile("m.metal.bin", FileFormat.METAL, 9_000, backends=(Backend.METAL,))
    only_metal = ModelNeed.of(model(metal))
    assert (only_metal.format, only_metal.size_bytes) == (FileFormat.METAL, 9_000)
    assert only_metal.runs_on(Backend.METAL) and not only_metal.runs_on(Backend.CUDA)

    both = ModelNeed.of(model(ManifestFile("m.gguf", FileFormat.GGUF, 4_000), metal))
    assert (both.format, both.size_bytes) == (FileFormat.GGUF, 4_000) and both.runs_on(Backend.CUDA)
