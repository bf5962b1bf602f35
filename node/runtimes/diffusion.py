"""Images with stable-diffusion.cpp (stable-diffusion-cpp-python): generate, edit, vary one checkpoint.

A model is a single-file checkpoint (``.gguf`` or ``.safetensors``), optionally with a VAE file whose name
contains ``vae``. Only models whose capabilities include ``image`` come here, so a chat GGUF never does.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from common.errors import ErrorCode, LlmlbError
from common.inference import GeneratedImage, GenerateImageRequest, ImageOperation
from common.types import Capability, FileFormat
from node.runtimes.base import LoadContext, RuntimeSpec, missing_file

if TYPE_CHECKING:
    from stable_diffusion_cpp import StableDiffusion

log = structlog.get_logger(__name__)

ENGINE = "stable-diffusion.cpp"
_MB = 1024 * 1024
DEFAULT_SIZE = 512
DEFAULT_STEPS = 20
DEFAULT_CFG_SCALE = 7.0
VARIATION_STRENGTH = 0.6  # how far a variation may move from its input image


class DiffusionRuntime:
    """Image generation for one stable-diffusion checkpoint."""

    engine = ENGINE
    capabilities = frozenset({Capability.IMAGE})

    def __init__(self, context: LoadContext) -> None:
        weights = [
            p
            for p in context.files_of(FileFormat.GGUF) + context.files_of(FileFormat.SAFETENSORS)
            if "vae" not in p.name.lower()
        ]
        if not weights:
            raise missing_file(context.model.id, "checkpoint (.gguf or .safetensors)")
        self.model_id = context.model.id
        self.checkpoint = weights[0]
        vaes = [
            p
            for p in context.files_of(FileFormat.SAFETENSORS) + context.files_of(FileFormat.GGUF)
            if "vae" in p.name.lower()
        ]
        self.vae: Path | None = vaes[0] if vaes else None
        self.settings = context.settings
        self._sd: StableDiffusion | None = None
        # One stable-diffusion.cpp context serves one image call at a time, however many slots the pool has.
        self._busy = threading.Lock()

    @property
    def sequences(self) -> int:
        """One image at a time (``_busy``): the balancer sends one call and keeps the rest queued."""
        return 1

    @property
    def memory_mb(self) -> int:
        total = 0
        for path in (self.checkpoint, self.vae):
            if path is not None:
                with contextlib.suppress(OSError):
                    total += path.stat().st_size
        return math.ceil(total / _MB) + 1024  # + activations at 512x512

    def load(self) -> None:
        try:
            from stable_diffusion_cpp import StableDiffusion
        except ImportError as exc:
            raise LlmlbError(
                ErrorCode.NO_CAPABLE_NODES,
                "stable-diffusion-cpp-python is not installed on this node; install it to serve images",
            ) from exc
        if not self.checkpoint.is_file():
            raise LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"{self.checkpoint} does not exist on this node")
        for path in (self.checkpoint, self.vae):
            # stable-diffusion.cpp accepts some damaged files and fails later, deep in native code.
            if path is not None and not looks_like_weights(path):
                raise LlmlbError(
                    ErrorCode.INTERNAL,
                    f"{path.name} of {self.model_id!r} is neither a GGUF nor a safetensors file",
                )
        try:
            self._sd = StableDiffusion(
                model_path=str(self.checkpoint),
                vae_path=str(self.vae) if self.vae else "",
                n_threads=self.settings.threads or -1,
                verbose=False,
            )
        except (ValueError, OSError, RuntimeError) as exc:
            raise LlmlbError(
                ErrorCode.INTERNAL,
                f"stable-diffusion.cpp could not load {self.checkpoint.name} for {self.model_id!r}: {exc}",
            ) from exc
        log.info("model_loaded", engine=ENGINE, model_id=self.model_id)

    def unload(self) -> None:
        sd, self._sd = self._sd, None
        if sd is not None:
            sd.close()

    def health(self) -> str | None:
        return None if self._sd is not None else "not loaded"

    def generate_images(self, request: GenerateImageRequest) -> list[GeneratedImage]:
        if self._sd is None:
            raise LlmlbError(ErrorCode.INTERNAL, f"model {self.model_id!r} is not loaded")
        seed = request.seed if request.seed is not None else random.getrandbits(31)
        options: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "width": request.width or DEFAULT_SIZE,
            "height": request.height or DEFAULT_SIZE,
            "sample_steps": request.steps or DEFAULT_STEPS,
            "cfg_scale": DEFAULT_CFG_SCALE if request.cfg_scale is None else request.cfg_scale,
            "seed": seed,
            "batch_count": request.n,
        }
        if request.operation is not ImageOperation.GENERATE:
            options["init_image"] = open_png(request.image, "image")
            if request.operation is ImageOperation.EDIT and request.mask:
                options["mask_image"] = open_png(request.mask, "mask")
            if request.operation is ImageOperation.VARIATION:
                options["strength"] = VARIATION_STRENGTH
        with self._busy:
            images = self._sd.generate_image(**options)
        return [GeneratedImage(png=to_png(image), seed=seed + i) for i, image in enumerate(images)]


def looks_like_weights(path: Path) -> bool:
    """True when the file starts like a GGUF, or like a safetensors file (u64 header size, then JSON)."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
            size = path.stat().st_size
    except OSError:
        return False
    if head.startswith(b"GGUF"):
        return True
    if len(head) < 9:
        return False
    header = int.from_bytes(head[:8], "little")
    return 2 <= header <= size - 8 and head[8:9] == b"{"


def open_png(data: bytes, what: str) -> Any:
    """A PIL image from request bytes; ``invalid_request`` when they are not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, f"{what} is not a readable image: {exc}") from exc
    return image


def to_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


SPEC = RuntimeSpec(
    engine=ENGINE,
    formats=frozenset({FileFormat.GGUF, FileFormat.SAFETENSORS}),
    capabilities=DiffusionRuntime.capabilities,
    create=DiffusionRuntime,
)
