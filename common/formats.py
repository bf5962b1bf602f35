"""File format and backend classification of repository files, by name alone."""

from __future__ import annotations

from pathlib import PurePosixPath

from common.errors import ErrorCode, LlmlbError
from common.types import Backend, Capability, FileFormat, Model

# Files a repository carries for people, not runtimes; never part of a manifest.
_DOC_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg", ".html", ".pdf")
_DOC_NAMES = {".gitattributes", ".gitignore", "license", "license.txt", "notice", "model_card"}
_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".yaml", ".yml", ".jinja", ".vocab", ".merges")
# Weight formats of other frameworks that no llmlb runtime loads; skipped to save node disk.
_FOREIGN_WEIGHTS = (".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".ot", ".tflite", ".mlmodel", ".npz")


# The formats that are a model's weights (its config and tokenizer files run anywhere), in the order a
# model is taken to be of: the first present names it.
WEIGHT_FORMATS = (
    FileFormat.GGUF,
    FileFormat.SAFETENSORS,
    FileFormat.WHISPER,
    FileFormat.ONNX,
    FileFormat.METAL,
)


def weight_formats(model: Model) -> frozenset[FileFormat]:
    """The weight formats among ``model``'s files."""
    return frozenset(f.format for f in model.files if f.format in WEIGHT_FORMATS)


def classify(filename: str) -> FileFormat:
    """The format of a repository file, decided by its name (see DESIGN.md's seed rules)."""
    name = PurePosixPath(filename).name.lower()
    if name.endswith(".metal.bin"):
        return FileFormat.METAL
    if name.endswith(".gguf"):
        return FileFormat.GGUF
    if name.endswith(".safetensors"):
        return FileFormat.SAFETENSORS
    if name.endswith(".onnx") or name.endswith(".onnx_data"):
        return FileFormat.ONNX
    if name == "model.bin" or (name.startswith("ggml-") and name.endswith(".bin")):
        return FileFormat.WHISPER  # CTranslate2 whisper weights or ggml whisper weights
    if name.endswith(_CONFIG_SUFFIXES):
        return FileFormat.CONFIG
    return FileFormat.OTHER


def backends_for(fmt: FileFormat) -> tuple[Backend, ...]:
    """Which node backends need a file of this format."""
    if fmt is FileFormat.METAL:
        return (Backend.METAL,)
    return (Backend.ANY,)


def is_manifest_file(filename: str) -> bool:
    """False for documentation and foreign-framework weights, which nodes never need."""
    path = PurePosixPath(filename)
    name = path.name.lower()
    if name in _DOC_NAMES or name.endswith(_DOC_SUFFIXES):
        return False
    if any(part.startswith(".") for part in path.parts):
        return False
    return not name.endswith(_FOREIGN_WEIGHTS)


def capabilities_for(formats: set[FileFormat]) -> list[Capability]:
    """Capabilities a model has by the formats of its files, when nobody said otherwise."""
    if FileFormat.GGUF in formats:
        return [Capability.CHAT, Capability.COMPLETION, Capability.EMBEDDING]
    if FileFormat.WHISPER in formats:
        return [Capability.TRANSCRIPTION]
    if FileFormat.ONNX in formats:
        return [Capability.SPEECH]
    if FileFormat.SAFETENSORS in formats or FileFormat.METAL in formats:
        return [Capability.CHAT, Capability.COMPLETION]
    return []


# Catalogue tags that say what a model is for (the original supported_models.json's vocabulary).
_TAG_CAPABILITIES: dict[str, tuple[Capability, ...]] = {
    "chat": (Capability.CHAT, Capability.COMPLETION),
    "instruct": (Capability.CHAT, Capability.COMPLETION),
    "completion": (Capability.COMPLETION,),
    "text-generation": (Capability.COMPLETION,),
    "embedding": (Capability.EMBEDDING,),
    "embeddings": (Capability.EMBEDDING,),
    "transcription": (Capability.TRANSCRIPTION,),
    "asr": (Capability.TRANSCRIPTION,),
    "speech": (Capability.SPEECH,),
    "tts": (Capability.SPEECH,),
    "image": (Capability.IMAGE,),
    "text-to-image": (Capability.IMAGE,),
}


def capabilities_from(formats: set[FileFormat], tags: list[str]) -> list[Capability]:
    """Capabilities of an entry that names none: what its tags say (a chat GGUF also embeds, as
    llama.cpp does), else what its formats allow (``capabilities_for``)."""
    said = {c for t in tags for c in _TAG_CAPABILITIES.get(t.strip().lower(), ())}
    if not said:
        return capabilities_for(formats)
    if Capability.CHAT in said and FileFormat.GGUF in formats:
        said.add(Capability.EMBEDDING)
    return [c for c in Capability if c in said]


def check_filename(filename: str) -> str:
    """A manifest filename must be a relative '/'-path with no '..' or empty segment."""
    path = PurePosixPath(filename)
    if (
        not filename
        or filename.startswith("/")
        or "\\" in filename
        or "\x00" in filename
        or any(part in ("..", ".", "") for part in filename.split("/"))
        or path.is_absolute()
    ):
        raise LlmlbError(ErrorCode.INVALID_REQUEST, f"bad file name {filename[:120]!r}")
    return filename


def read_range_end(file_size: int, offset: int, length: int) -> int:
    """Where a ``ReadBlob`` of ``length`` bytes (0: to the end) from ``offset`` stops; bad ranges raise.

    The balancer's proxy and a node serving peers check ranges by this one rule.
    """
    if offset < 0 or length < 0:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, "offset and length must not be negative")
    if offset > file_size or (offset == file_size and file_size):
        raise LlmlbError(ErrorCode.INVALID_REQUEST, f"offset {offset} is past the end of the file")
    return min(file_size, offset + length) if length else file_size
