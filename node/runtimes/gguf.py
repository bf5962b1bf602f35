"""A GGUF file's header, read without its tensors: the metadata llama.cpp models carry, and the KV cache
size it implies, for the node's memory estimate before a model is loaded.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)
_MB = 1024 * 1024


def kv_cache_mb(metadata: dict[str, Any], context_tokens: int) -> int:
    """f16 K and V caches for ``context_tokens`` tokens, from a GGUF's architecture metadata."""
    arch = str(metadata.get("general.architecture", ""))
    layers = int(metadata.get(f"{arch}.block_count", 0))
    embd = int(metadata.get(f"{arch}.embedding_length", 0))
    heads = int(metadata.get(f"{arch}.attention.head_count", 0)) or 1
    kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", 0)) or heads
    key_len = int(metadata.get(f"{arch}.attention.key_length", 0)) or embd // heads
    value_len = int(metadata.get(f"{arch}.attention.value_length", 0)) or key_len
    per_token = layers * kv_heads * (key_len + value_len) * 2
    return math.ceil(per_token * context_tokens / _MB)


_GGUF_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar key/values of a GGUF header, read without touching tensor data; {} if unreadable.

    Arrays (the tokenizer's vocabulary) are skipped, so this takes milliseconds even for large models.
    """
    values: dict[str, Any] = {}
    try:
        with path.open("rb") as f:

            def scalar(kind: int) -> Any:
                fmt = _GGUF_SCALARS[kind]
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

            def string() -> str:
                (size,) = struct.unpack("<Q", f.read(8))
                return f.read(size).decode("utf-8", errors="replace")

            def skip(kind: int) -> None:
                if kind == _GGUF_STRING:
                    (size,) = struct.unpack("<Q", f.read(8))
                    f.seek(size, 1)
                elif kind == _GGUF_ARRAY:
                    item, count = struct.unpack("<IQ", f.read(12))
                    if item in _GGUF_SCALARS:
                        f.seek(struct.calcsize(_GGUF_SCALARS[item]) * count, 1)
                    else:
                        for _ in range(count):
                            skip(item)
                else:
                    f.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)

            if f.read(4) != b"GGUF":
                return {}
            (version,) = struct.unpack("<I", f.read(4))
            if version < 2:
                return {}
            _tensors, count = struct.unpack("<QQ", f.read(16))
            for _ in range(count):
                key = string()
                (kind,) = struct.unpack("<I", f.read(4))
                if kind == _GGUF_STRING:
                    values[key] = string()
                elif kind in _GGUF_SCALARS:
                    values[key] = scalar(kind)
                else:
                    skip(kind)
    except (OSError, struct.error, KeyError, RecursionError) as exc:
        # A damaged file fails at load with the engine's own message; the estimate falls back to its size.
        log.warning("gguf_metadata_unreadable", path=str(path), error=repr(exc))
    return values
