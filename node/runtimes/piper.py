"""Text to speech with a Piper voice on onnxruntime; phonemes from espeak-ng as ``piper-onnx`` bundles it.

Audio streams one sentence at a time: the first chunk goes out as soon as the first sentence is spoken.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from common.errors import ErrorCode, LlmlbError
from common.inference import AudioChunk, AudioFormat, SpeakRequest
from common.types import Backend, Capability, FileFormat
from node.runtimes.audio import to_pcm16, wav_header
from node.runtimes.base import CancelFlag, LoadContext, RuntimeSpec, missing_file

if TYPE_CHECKING:
    from piper_onnx import Piper

log = structlog.get_logger(__name__)

ENGINE = "onnxruntime"
_MB = 1024 * 1024
# espeak-ng keeps global state: one phonemizer call at a time in the whole process.
_ESPEAK_LOCK = threading.Lock()
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
CHUNK_SAMPLES = 8192  # audio is sent in pieces of at most this many samples


def execution_providers(backend: Backend, available: Sequence[str]) -> list[str]:
    """onnxruntime execution providers for a backend, best first, limited to those installed.

    CUDA needs the ``onnxruntime-gpu`` build (the ``cuda`` extra); Metal nodes use CoreML. The CPU
    provider always comes last as the fallback.
    """
    wanted = {
        Backend.CUDA: ["CUDAExecutionProvider"],
        Backend.METAL: ["CoreMLExecutionProvider"],
    }.get(backend, [])
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


class PiperRuntime:
    """Speech for one Piper voice (``.onnx`` plus its ``.onnx.json``)."""

    engine = ENGINE
    capabilities = frozenset({Capability.SPEECH})

    def __init__(self, context: LoadContext) -> None:
        models = context.files_of(FileFormat.ONNX)
        if not models:
            raise missing_file(context.model.id, ".onnx")
        self.model_id = context.model.id
        self.onnx = models[0]
        config = context.file_named(self.onnx.name + ".json")
        if config is None:
            raise missing_file(context.model.id, f"{self.onnx.name}.json voice config")
        self.config_path = config
        self.settings = context.settings
        self._piper: Piper | None = None
        self._config: dict[str, Any] = {}
        self.providers: list[str] = []

    @property
    def memory_mb(self) -> int:
        try:
            size = self.onnx.stat().st_size
        except OSError:
            size = 0
        return math.ceil(2 * size / _MB) + 50  # weights plus onnxruntime's arena

    @property
    def sample_rate(self) -> int:
        return int(self._config.get("audio", {}).get("sample_rate", 22050))

    def load(self) -> None:
        import onnxruntime as ort
        from piper_onnx import Piper

        try:
            self._config = json.loads(Path(self.config_path).read_text(encoding="utf-8"))
            options = ort.SessionOptions()
            if self.settings.threads:
                options.intra_op_num_threads = self.settings.threads
            self.providers = execution_providers(self.settings.backend, ort.get_available_providers())
            session = ort.InferenceSession(str(self.onnx), sess_options=options, providers=self.providers)
            self._piper = Piper.from_session(session, str(self.config_path))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise LlmlbError(
                ErrorCode.INTERNAL, f"onnxruntime could not load {self.model_id!r}: {exc}"
            ) from exc
        except Exception as exc:  # onnxruntime's own exception types do not share a base we can name
            raise LlmlbError(
                ErrorCode.INTERNAL, f"onnxruntime could not load {self.model_id!r}: {exc}"
            ) from exc
        log.info("model_loaded", engine=ENGINE, model_id=self.model_id, providers=self.providers)

    def unload(self) -> None:
        self._piper = None

    def health(self) -> str | None:
        return None if self._piper is not None else "not loaded"

    def voices(self) -> list[str]:
        return sorted((self._config.get("speaker_id_map") or {}).keys())

    def _phonemes(self, sentence: str) -> str:
        from phonemizer import phonemize

        language = str(self._config.get("espeak", {}).get("voice", "en-us"))
        with _ESPEAK_LOCK:
            return str(
                phonemize(
                    sentence, language=language, backend="espeak", preserve_punctuation=True, with_stress=True
                )
            )

    def speak(self, request: SpeakRequest, cancel: CancelFlag) -> Iterator[AudioChunk]:
        piper = self._piper
        if piper is None:
            raise LlmlbError(ErrorCode.INTERNAL, f"model {self.model_id!r} is not loaded")
        speakers = self._config.get("speaker_id_map") or {}
        if request.voice and speakers and request.voice not in speakers:
            raise LlmlbError(
                ErrorCode.INVALID_REQUEST,
                f"voice {request.voice!r} is not one of {', '.join(sorted(speakers))}",
            )
        # Resolved here, as an id: a single-speaker voice ignores OpenAI's voice names ("alloy", ...).
        speaker = int(speakers[request.voice]) if request.voice and speakers else 0
        inference = self._config.get("inference", {})
        length_scale = float(inference.get("length_scale", 1.0)) / (request.speed or 1.0)
        rate = self.sample_rate

        def chunk(data: bytes, last: bool = False) -> AudioChunk:
            return AudioChunk(
                data=data, sample_rate=rate, channels=1, sample_width=2, format=request.format, last=last
            )

        if request.format is AudioFormat.WAV:
            yield chunk(wav_header(rate))
        for sentence in split_sentences(request.input):
            if cancel.is_set():
                return
            samples, _ = piper.create(
                self._phonemes(sentence),
                speaker_id=speaker,
                is_phonemes=True,
                length_scale=length_scale,  # type: ignore[arg-type]
            )
            pcm = to_pcm16(samples)
            step = CHUNK_SAMPLES * 2
            for start in range(0, len(pcm), step):
                yield chunk(pcm[start : start + step])
        yield chunk(b"", last=True)


SPEC = RuntimeSpec(
    engine=ENGINE,
    formats=frozenset({FileFormat.ONNX}),
    capabilities=PiperRuntime.capabilities,
    create=PiperRuntime,
)
