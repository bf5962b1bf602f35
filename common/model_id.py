"""Model-id rules: what a valid id is, its normal form, and where its files live on disk.

An id is at most 256 characters of letters, digits, ``-``, ``_``, ``.`` and ``/``; it has no ``..``,
no empty or ``.`` path segment, and no leading or trailing ``/``. Ids are case-insensitive and stored
lower-cased. A bad id raises ``invalid_model_id`` before anything touches the filesystem.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.errors import ErrorCode, LlmlbError

MAX_MODEL_ID_LENGTH = 256
_ALLOWED = re.compile(r"[a-z0-9._/-]+")
_DISALLOWED_RUN = re.compile(r"[^a-z0-9._/-]+")


def normalize_model_id(raw: str) -> str:
    """Returns the normal (lower-cased) form of ``raw`` or raises ``invalid_model_id``."""
    if not isinstance(raw, str) or not raw:
        raise LlmlbError(ErrorCode.INVALID_MODEL_ID, "model id must be a non-empty string")
    if len(raw) > MAX_MODEL_ID_LENGTH:
        raise LlmlbError(
            ErrorCode.INVALID_MODEL_ID,
            f"model id is {len(raw)} characters long; the limit is {MAX_MODEL_ID_LENGTH}",
        )
    model_id = raw.lower()
    if not _ALLOWED.fullmatch(model_id):
        raise LlmlbError(
            ErrorCode.INVALID_MODEL_ID,
            f"model id {_shown(raw)} may contain only letters, digits, '-', '_', '.' and '/'",
        )
    if model_id.startswith("/") or model_id.endswith("/"):
        raise LlmlbError(ErrorCode.INVALID_MODEL_ID, f"model id {_shown(raw)} must not start or end with '/'")
    if ".." in model_id:
        raise LlmlbError(ErrorCode.INVALID_MODEL_ID, f"model id {_shown(raw)} must not contain '..'")
    if any(segment in ("", ".") for segment in model_id.split("/")):
        raise LlmlbError(
            ErrorCode.INVALID_MODEL_ID, f"model id {_shown(raw)} has an empty or '.' path segment"
        )
    return model_id


def derive_model_id(repo_id: str, filename: str = "") -> str:
    """An id for a registered repository: ``org/repo`` or, for one file, ``org/repo/file-stem``.

    Characters outside the id alphabet are replaced by ``-`` so any Hugging Face repo name works.
    """
    base = repo_id.strip("/")
    if filename:
        stem = filename.rsplit("/", 1)[-1]
        for suffix in (".metal.bin", ".gguf", ".safetensors", ".onnx", ".bin"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        base = f"{base}/{stem}"
    cleaned = _DISALLOWED_RUN.sub("-", base.lower())
    return normalize_model_id(cleaned)


def model_dir(models_dir: Path, model_id: str) -> Path:
    """The directory holding a model's files under ``models_dir``; never outside it."""
    normal = normalize_model_id(model_id)
    root = models_dir.resolve()
    path = (root / normal).resolve()
    if root != path and root not in path.parents:  # the rules above make this unreachable; keep the guard
        raise LlmlbError(ErrorCode.INVALID_MODEL_ID, f"model id {_shown(model_id)} escapes the models dir")
    return path


def _shown(raw: str) -> str:
    # Echo at most a bounded prefix of a hostile id back to the client.
    return repr(raw if len(raw) <= 80 else raw[:77] + "...")
