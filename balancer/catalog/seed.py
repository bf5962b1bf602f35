"""The seed catalogue: ``supported_models.json`` read into ``Model`` records.

Format: ``{"models": [{id, name, source, repo_id, artifacts: [{filename, size_bytes, sha256?}],
required_vram_mb, tags, capabilities?, revision?, chat_template?}]}``. Entries are seeded into the store
once; a model an operator deleted stays deleted across restarts.

The original format is accepted as written: ``source`` may also be ``hf_gguf``, ``hf_safetensors`` or
``hf_onnx`` (all Hugging Face repositories); an entry naming no ``capabilities`` gets them from its tags
and formats (``common.formats.capabilities_from``); a ``size_bytes`` without a ``sha256`` is only a
hint, which ``Catalog.seed`` replaces by the exact size and sha256 pinned at the origin.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from common.errors import LlmlbError
from common.formats import backends_for, capabilities_from, check_filename, classify
from common.model_id import normalize_model_id
from common.types import Capability, ManifestFile, Model, ModelSource

# Sources of the original catalogue format: the file format is the artifacts' own, so each is "hf".
_SOURCES = {"hf_gguf": ModelSource.HF, "hf_safetensors": ModelSource.HF, "hf_onnx": ModelSource.HF}


class CatalogError(ValueError):
    """A catalogue file that cannot be used; the message names the entry and field."""


def default_catalog_text() -> str:
    return resources.files("balancer").joinpath("supported_models.json").read_text(encoding="utf-8")


def load_catalog(path: Path | None, default_origin: str) -> list[Model]:
    """Reads the catalogue at ``path`` (the packaged one when None)."""
    text = default_catalog_text() if path is None else Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path or 'supported_models.json'}: not JSON: {exc}") from None
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CatalogError("catalogue must be an object with a 'models' list")
    models = [_entry(i, e, default_origin) for i, e in enumerate(entries)]
    seen: set[str] = set()
    for m in models:
        if m.id in seen:
            raise CatalogError(f"model id {m.id!r} appears twice in the catalogue")
        seen.add(m.id)
    return models


def _entry(index: int, entry: Any, default_origin: str) -> Model:
    where = f"catalogue entry {index}"
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: not an object")
    try:
        model_id = normalize_model_id(str(entry.get("id", "")))
        where = f"catalogue entry {model_id!r}"
        raw_source = str(entry.get("source", "hf"))
        source = _SOURCES.get(raw_source) or ModelSource(raw_source)
        files = []
        for artifact in entry.get("artifacts", []):
            filename = check_filename(str(artifact["filename"]))
            fmt = classify(filename)
            files.append(
                ManifestFile(
                    filename=filename,
                    format=fmt,
                    size_bytes=int(artifact["size_bytes"]),
                    sha256=str(artifact.get("sha256", "")).lower(),
                    backends=backends_for(fmt),
                )
            )
        tags = [str(t) for t in entry.get("tags", [])]
        named = [Capability(c) for c in entry.get("capabilities", [])]
        return Model(
            id=model_id,
            name=str(entry.get("name") or model_id),
            source=source,
            repo_id=str(entry.get("repo_id", "")),
            revision=str(entry.get("revision", "")),
            origin=str(entry.get("origin") or default_origin),
            files=files,
            capabilities=named or capabilities_from({f.format for f in files}, tags),
            tags=tags,
            required_vram_mb=int(entry.get("required_vram_mb", 0)),
            chat_template=str(entry.get("chat_template", "")),
            from_catalog=True,
        )
    except LlmlbError as exc:
        raise CatalogError(f"{where}: {exc.message}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CatalogError(f"{where}: {exc!r}") from None
