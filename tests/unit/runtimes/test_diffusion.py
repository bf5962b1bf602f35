"""The stable-diffusion runtime's contract, without weights (none are small enough to ship here)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from common.errors import ErrorCode, LlmlbError
from common.inference import GenerateImageRequest, ImageOperation
from common.types import Capability, FileFormat, ManifestFile, Model, ModelSource
from node.runtimes.base import ImageGeneration, LoadContext, Runtime
from node.runtimes.diffusion import DiffusionRuntime, open_png, to_png


def image_model(tmp_path: Path, files: dict[str, bytes]) -> LoadContext:
    paths = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = tmp_path / name
    fmt = {".gguf": FileFormat.GGUF, ".safetensors": FileFormat.SAFETENSORS}
    model = Model(
        id="sd-test",
        name="sd",
        source=ModelSource.LOCAL,
        repo_id="",
        revision="",
        origin="",
        files=[ManifestFile(n, fmt[Path(n).suffix], len(d)) for n, d in files.items()],
        capabilities=[Capability.IMAGE],
    )
    return LoadContext(model, paths)


def test_it_is_a_runtime_that_generates_images(tmp_path: Path) -> None:
    runtime = DiffusionRuntime(image_model(tmp_path, {"sd.safetensors": b"x"}))
    assert isinstance(runtime, Runtime) and isinstance(runtime, ImageGeneration)
    assert runtime.capabilities == frozenset({Capability.IMAGE})
    assert runtime.health() == "not loaded"


def test_checkpoint_and_vae_are_told_apart_and_sized(tmp_path: Path) -> None:
    runtime = DiffusionRuntime(
        image_model(tmp_path, {"sd-turbo.gguf": b"\0" * (3 << 20), "sdxl_vae.safetensors": b"\0" * (1 << 20)})
    )
    assert runtime.checkpoint.name == "sd-turbo.gguf"
    assert runtime.vae is not None and runtime.vae.name == "sdxl_vae.safetensors"
    assert runtime.memory_mb == 4 + 1024


def test_a_model_with_only_a_vae_has_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(LlmlbError) as caught:
        DiffusionRuntime(image_model(tmp_path, {"vae.safetensors": b"x"}))
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND and "checkpoint" in caught.value.message


def test_a_damaged_checkpoint_fails_to_load_with_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("stable_diffusion_cpp")
    runtime = DiffusionRuntime(image_model(tmp_path, {"broken.safetensors": b"not a checkpoint" * 64}))
    with pytest.raises(LlmlbError) as caught:
        runtime.load()
    assert "broken.safetensors" in caught.value.message and "sd-test" in caught.value.message
    assert runtime.health() == "not loaded"


def test_a_checkpoint_missing_on_disk_is_model_not_found(tmp_path: Path) -> None:
    context = image_model(tmp_path, {"gone.gguf": b"x"})
    context.paths["gone.gguf"].unlink()
    with pytest.raises(LlmlbError) as caught:
        DiffusionRuntime(context).load()
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND


def test_generating_before_load_is_refused(tmp_path: Path) -> None:
    runtime = DiffusionRuntime(image_model(tmp_path, {"sd.gguf": b"x"}))
    with pytest.raises(LlmlbError, match="not loaded"):
        runtime.generate_images(GenerateImageRequest("sd-test", "a cat"))


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GenerateImageRequest("m", ""), "prompt"),
        (GenerateImageRequest("m", "x", operation=ImageOperation.EDIT), "needs an input image"),
        (GenerateImageRequest("m", "x", n=11), "n must be"),
        (GenerateImageRequest("m", "x", width=500), "multiple of 64"),
    ],
)
def test_bad_image_requests_are_invalid(request_: GenerateImageRequest, message: str) -> None:
    with pytest.raises(LlmlbError) as caught:
        request_.validate()
    assert caught.value.code is ErrorCode.INVALID_REQUEST and message in caught.value.message


def test_png_round_trip_and_non_images_are_invalid() -> None:
    from PIL import Image

    png = to_png(Image.new("RGB", (8, 8), (255, 0, 0)))
    assert png.startswith(b"\x89PNG") and open_png(png, "image").size == (8, 8)
    with pytest.raises(LlmlbError) as caught:
        open_png(b"nope", "mask")
    assert caught.value.code is ErrorCode.INVALID_REQUEST and "mask" in caught.value.message


class PaintingStub:
    """Stands in for a loaded ``StableDiffusion``: checks each call against the real method's signature
    and paints one flat image per batch item, so what the runtime asks for is what the engine accepts."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def generate_image(self, **options: Any) -> list[Any]:
        from PIL import Image
        from stable_diffusion_cpp import StableDiffusion

        inspect.signature(StableDiffusion.generate_image).bind(None, **options)  # unknown names fail here
        self.calls.append(options)
        size = (options["width"], options["height"])
        return [Image.new("RGB", size, (i * 40, 0, 0)) for i in range(options["batch_count"])]

    def close(self) -> None:
        pass


def painting_runtime(tmp_path: Path) -> tuple[DiffusionRuntime, PaintingStub]:
    pytest.importorskip("stable_diffusion_cpp")
    runtime = DiffusionRuntime(image_model(tmp_path, {"sd.gguf": b"x"}))
    stub = PaintingStub()
    runtime._sd = stub  # type: ignore[assignment]
    return runtime, stub


def test_a_generation_asks_the_engine_for_each_image_and_returns_pngs_with_their_seeds(
    tmp_path: Path,
) -> None:
    runtime, stub = painting_runtime(tmp_path)
    request = GenerateImageRequest("sd-test", "a red barn", n=2, width=128, height=64, steps=4, seed=7)
    images = runtime.generate_images(request)
    [call] = stub.calls
    assert call["prompt"] == "a red barn" and call["batch_count"] == 2 and call["sample_steps"] == 4
    assert "init_image" not in call
    assert [i.seed for i in images] == [7, 8]
    assert [open_png(i.png, "out").size for i in images] == [(128, 64), (128, 64)]


def test_edits_and_variations_hand_the_engine_their_input_images(tmp_path: Path) -> None:
    from PIL import Image

    runtime, stub = painting_runtime(tmp_path)
    source = to_png(Image.new("RGB", (64, 64), (0, 0, 255)))
    mask = to_png(Image.new("L", (64, 64), 255))
    runtime.generate_images(
        GenerateImageRequest(
            "sd-test", "blue", ImageOperation.EDIT, image=source, mask=mask, width=64, height=64
        )
    )
    runtime.generate_images(
        GenerateImageRequest("sd-test", "", ImageOperation.VARIATION, image=source, width=64, height=64)
    )
    edit, variation = stub.calls
    assert edit["init_image"].size == (64, 64) and edit["mask_image"].mode == "L"
    assert "strength" not in edit
    assert variation["init_image"].getpixel((0, 0)) == (0, 0, 255) and 0 < variation["strength"] < 1
    with pytest.raises(LlmlbError) as caught:
        runtime.generate_images(GenerateImageRequest("sd-test", "x", ImageOperation.EDIT, image=b"not a png"))
    assert caught.value.code is ErrorCode.INVALID_REQUEST
