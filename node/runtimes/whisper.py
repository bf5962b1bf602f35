"""Speech to text with faster-whisper (CTranslate2): a ``model.bin`` plus its config and vocabulary."""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from common.errors import ErrorCode, LlmlbError
from common.inference import TranscribeRequest, Transcript, TranscriptSegment
from common.types import Backend, Capability, FileFormat
from node.runtimes.base import CancelFlag, LoadContext, RuntimeSpec, missing_file

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

log = structlog.get_logger(__name__)

ENGINE = "faster-whisper"
_MB = 1024 * 1024
# CTranslate2 wants these beside model.bin in one directory.
COMPANION_FILES = (
    "config.json",
    "tokenizer.json",
    "vocabulary.txt",
    "vocabulary.json",
    "preprocessor_config.json",
)


def device_for(backend: Backend) -> tuple[str, str]:
    """CTranslate2 (device, compute_type) for a node backend; Metal has no CTranslate2 device."""
    if backend is Backend.CUDA:
        return "cuda", "float16"
    return "cpu", "int8"


class WhisperRuntime:
    """Transcription for one CTranslate2 whisper model."""

    engine = ENGINE
    capabilities = frozenset({Capability.TRANSCRIPTION})

    def __init__(self, context: LoadContext) -> None:
        weights = context.file_named("model.bin")
        if weights is None:
            raise missing_file(context.model.id, "model.bin")
        self.model_id = context.model.id
        self.weights = weights
        self.companions = {name: p for name in COMPANION_FILES if (p := context.file_named(name)) is not None}
        self.settings = context.settings
        self.device, self.compute_type = device_for(self.settings.backend)
        self._model: WhisperModel | None = None
        self._linked: tempfile.TemporaryDirectory[str] | None = None

    @property
    def memory_mb(self) -> int:
        try:
            size = self.weights.stat().st_size
        except OSError:
            size = 0
        return math.ceil(size / _MB) + 200  # + decoder state and audio features

    def _model_dir(self) -> Path:
        """The directory holding model.bin and its companions, linking them together if they are apart."""
        directory = self.weights.parent
        if all(p.parent == directory for p in self.companions.values()):
            return directory
        self._linked = tempfile.TemporaryDirectory(prefix="xllm-whisper-")
        linked = Path(self._linked.name)
        (linked / "model.bin").symlink_to(self.weights)
        for name, path in self.companions.items():
            (linked / name).symlink_to(path)
        return linked

    def load(self) -> None:
        from faster_whisper import WhisperModel

        try:
            self._model = WhisperModel(
                str(self._model_dir()),
                device=self.device,
                compute_type=self.compute_type,
                cpu_threads=self.settings.threads,
                num_workers=max(1, self.settings.slots),
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise LlmlbError(
                ErrorCode.INTERNAL, f"faster-whisper could not load {self.model_id!r}: {exc}"
            ) from exc
        log.info("model_loaded", engine=ENGINE, model_id=self.model_id, device=self.device)

    def unload(self) -> None:
        self._model = None
        if self._linked is not None:
            self._linked.cleanup()
            self._linked = None

    def health(self) -> str | None:
        return None if self._model is not None else "not loaded"

    def transcribe(self, request: TranscribeRequest, cancel: CancelFlag | None = None) -> Transcript:
        """The whole transcript; a set ``cancel`` stops it between segments (each up to 30 s of audio)."""
        if self._model is None:
            raise LlmlbError(ErrorCode.INTERNAL, f"model {self.model_id!r} is not loaded")
        audio = decode_audio(request.audio, request.filename)
        options: dict[str, Any] = {"beam_size": 5, "vad_filter": False}
        if request.language:
            options["language"] = request.language.lower()
        if request.prompt:
            options["initial_prompt"] = request.prompt
        if request.temperature is not None:
            options["temperature"] = request.temperature
        try:
            segments, info = self._model.transcribe(audio, **options)
            found = []
            for segment in segments:  # decoded lazily, one window at a time
                if cancel is not None and cancel.is_set():
                    raise LlmlbError(ErrorCode.CANCELLED, "transcription cancelled: the caller went away")
                found.append(segment)
        except ValueError as exc:  # e.g. a language code whisper does not know
            raise LlmlbError(ErrorCode.INVALID_REQUEST, f"cannot transcribe: {exc}") from exc
        out = tuple(
            TranscriptSegment(
                id=i,
                start=float(s.start),
                end=float(s.end),
                text=s.text.strip(),
                avg_logprob=float(s.avg_logprob),
                no_speech_prob=float(s.no_speech_prob),
                compression_ratio=float(s.compression_ratio),
                temperature=float(s.temperature or 0.0),
                tokens=tuple(int(t) for t in s.tokens),
            )
            for i, s in enumerate(found)
        )
        return Transcript(
            text=" ".join(s.text for s in out if s.text).strip(),
            language=info.language,
            duration=float(info.duration),
            segments=out,
        )


def decode_audio(data: bytes, filename: str = "") -> Any:
    """16 kHz mono float samples from a whole audio file; ``invalid_request`` when it is not audio."""
    from faster_whisper.audio import decode_audio as _decode

    name = filename or "upload"
    try:
        samples = _decode(io.BytesIO(data), sampling_rate=16000)
    except Exception as exc:  # PyAV raises its own error family for every undecodable input
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST, f"{name}: not a readable audio file (wav, mp3, flac, ogg, ...): {exc}"
        ) from exc
    if len(samples) == 0:
        raise LlmlbError(ErrorCode.INVALID_REQUEST, f"{name}: no audio samples could be decoded")
    return samples


SPEC = RuntimeSpec(
    engine=ENGINE,
    formats=frozenset({FileFormat.WHISPER}),
    capabilities=WhisperRuntime.capabilities,
    create=WhisperRuntime,
)
