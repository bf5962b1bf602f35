"""The one small protocol every runtime implements, and the capability protocols on top of it.

A runtime is built cheaply from a ``LoadContext`` (nothing read yet), tells how much memory it will
take, then ``load()`` and ``unload()`` run on a worker thread. Calls into a loaded runtime are blocking
too; the pool runs them off the event loop and never runs more at once than its slots allow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from common.config import DEFAULT_PREFIX_CACHE_MB
from common.errors import ErrorCode, LlmlbError
from common.inference import (
    AudioChunk,
    ChatRequest,
    CompleteRequest,
    EmbedRequest,
    GeneratedImage,
    GenerateImageRequest,
    SpeakRequest,
    TextChunk,
    TranscribeRequest,
    Transcript,
    Usage,
)
from common.types import Backend, Capability, FileFormat, Model


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """Engine knobs every runtime may read; the pool fills them from its settings and the hardware."""

    backend: Backend = Backend.CPU
    threads: int = 0  # CPU threads per engine call; 0: the engine's choice from the core count
    context_tokens: int = 4096  # llama.cpp context window per slot
    gpu_layers: int | None = None  # None: all layers on a GPU backend, none on the CPU
    slots: int = 1  # concurrent calls the pool may make into one loaded runtime
    batching: bool = True  # llama.cpp: the slots are sequences of one context, decoded in one batch per step
    batch_exact: bool = False  # llama.cpp batching: decode each sequence's part of a step on its own
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB  # llama.cpp: saved prompt-prefix states per model
    vllm_command: str = ""  # the vLLM server command for safetensors models; "": vLLM's own, on CUDA


class PrefixListener(Protocol):
    """Hears which prompt prefixes a loaded model keeps computed, whenever that set changes.

    Called on the runtime's worker thread; an empty list means the model keeps none (e.g. unloaded).
    """

    def prefixes_changed(self, model_id: str, hashes: Sequence[int]) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadContext:
    """What a runtime is built from: the model, where its files are, and the node's settings."""

    model: Model
    paths: Mapping[str, Path]  # manifest filename -> absolute path on disk
    settings: RuntimeSettings = field(default_factory=RuntimeSettings)
    prefix_listener: PrefixListener | None = None  # told of the prefixes a text runtime keeps

    def files_of(self, fmt: FileFormat) -> list[Path]:
        return [
            self.paths[f.filename] for f in self.model.files if f.format is fmt and f.filename in self.paths
        ]

    def file_named(self, name: str) -> Path | None:
        """The path of the manifest file whose base name is ``name``, if the model has one."""
        for filename, path in self.paths.items():
            if filename.rsplit("/", 1)[-1] == name:
                return path
        return None

    def bytes_on_disk(self, fmt: FileFormat | None = None) -> int:
        total = 0
        for f in self.model.files:
            if fmt is not None and f.format is not fmt:
                continue
            path = self.paths.get(f.filename)
            try:
                total += path.stat().st_size if path is not None else f.size_bytes
            except OSError:
                total += f.size_bytes
        return total


@runtime_checkable
class Runtime(Protocol):
    """What every engine offers the pool."""

    @property
    def engine(self) -> str:
        """Short engine name reported to the balancer, e.g. ``llama.cpp``."""
        ...

    @property
    def capabilities(self) -> frozenset[Capability]: ...

    @property
    def memory_mb(self) -> int:
        """Memory the loaded model takes (host RAM on the CPU, device memory on a GPU), estimated."""
        ...

    def load(self) -> None:
        """Reads the weights; blocking. Raises ``LlmlbError`` with a clear message when it cannot."""
        ...

    def unload(self) -> None:
        """Frees everything ``load`` took; blocking. Safe to call twice."""
        ...

    def health(self) -> str | None:
        """None when the runtime can serve, else why not."""
        ...


# The flag a streaming call checks between steps: set when the caller went away.
CancelFlag = threading.Event


@runtime_checkable
class TextGeneration(Runtime, Protocol):
    def chat(self, request: ChatRequest, cancel: CancelFlag) -> Iterator[TextChunk]:
        """Text deltas, choice after choice (``TextChunk.index``) when ``params.n`` > 1.

        Each choice's last chunk has its ``finish_reason``; the very last chunk has the ``usage`` of all.
        """
        ...

    def complete(self, request: CompleteRequest, cancel: CancelFlag) -> Iterator[TextChunk]: ...


@runtime_checkable
class PrefixCaching(Protocol):
    """A runtime that keeps computed prompt prefixes (see ``node.runtimes.prefix_cache``)."""

    @property
    def prefix_cache_bytes(self) -> int:
        """Bytes of saved prefix states held now."""
        ...


@runtime_checkable
class KvCacheReporting(Protocol):
    """A runtime backed by a model server that reports how full its key/value cache is (vLLM)."""

    @property
    def kv_cache_usage(self) -> float | None:
        """The share (0..1) of its key/value cache in use, as last read; None when not known."""
        ...


@runtime_checkable
class FewerSequences(Protocol):
    """A runtime that runs fewer sequences at once than the pool's slots would let in.

    The pool reports each loaded model's slots to the balancer, which sends the node no more calls for
    it than that (plus a small queue allowance); a runtime without this property runs every slot's
    call at once (llama.cpp's batched sequences or per-slot contexts, faster-whisper's workers, Piper's
    onnxruntime session, vLLM's server, which the pool also gives no more than its slots).
    """

    @property
    def sequences(self) -> int:
        """How many calls it really runs at once, at least 1."""
        ...


@runtime_checkable
class Embedding(Runtime, Protocol):
    def embed(self, request: EmbedRequest) -> tuple[list[list[float]], Usage]: ...


@runtime_checkable
class Transcription(Runtime, Protocol):
    def transcribe(self, request: TranscribeRequest, cancel: CancelFlag | None = None) -> Transcript: ...


@runtime_checkable
class Speech(Runtime, Protocol):
    def speak(self, request: SpeakRequest, cancel: CancelFlag) -> Iterator[AudioChunk]: ...


@runtime_checkable
class ImageGeneration(Runtime, Protocol):
    def generate_images(self, request: GenerateImageRequest) -> list[GeneratedImage]: ...


@dataclass(frozen=True, slots=True)
class RuntimeSpec:
    """How a node knows an engine: the file formats it loads and what it serves with them."""

    engine: str
    formats: frozenset[FileFormat]  # a model with a file of one of these formats can load here
    capabilities: frozenset[Capability]
    create: Callable[[LoadContext], Runtime]

    def serves(self, model: Model, capability: Capability) -> bool:
        return capability in self.capabilities and any(f.format in self.formats for f in model.files)


def missing_file(model_id: str, what: str) -> LlmlbError:
    return LlmlbError(ErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} has no {what} file on this node")


def generation_budget(prompt_tokens: int, n_ctx: int, max_tokens: int | None) -> int:
    """How many tokens an answer may have: ``max_tokens`` within the room the context window leaves.

    A prompt that fills the window is the caller's error.
    """
    if prompt_tokens >= n_ctx:
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST,
            f"the prompt is {prompt_tokens} tokens; this model's context window here is {n_ctx}",
        )
    room = n_ctx - prompt_tokens
    return min(max_tokens, room) if max_tokens else room
