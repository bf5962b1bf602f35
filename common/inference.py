"""Inference requests and answers as plain dataclasses, shared by the node runtimes and the balancer's router.

Protobuf conversion lives in ``common.inference_pb``; the HTTP shim converts OpenAI JSON to the same types.
``validate()`` on a request checks what every door must refuse with ``invalid_request``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Protocol

from common.errors import ErrorCode, LlmlbError

MAX_STOP_SEQUENCES = 4
SPEECH_MAX_INPUT_CHARS = 4096  # OpenAI's limit for /v1/audio/speech


class InferenceRequest(Protocol):
    """What every inference request has: the model it names, its id, and its own checks."""

    @property
    def model(self) -> str: ...

    @property
    def request_id(self) -> str: ...

    def validate(self) -> None: ...


def _invalid(message: str) -> LlmlbError:
    return LlmlbError(ErrorCode.INVALID_REQUEST, message)


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and (math.isnan(value) or not low <= value <= high):
        raise _invalid(f"{name} must be between {low:g} and {high:g}, got {value:g}")


class FinishReason(enum.StrEnum):
    """Why a stream ended; set on its last chunk only."""

    STOP = "stop"  # end of text or a stop sequence
    LENGTH = "length"  # max_tokens or the context window reached
    CANCELLED = "cancelled"  # the caller went away


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling controls; ``None`` takes the runtime's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _invalid(f"max_tokens must be at least 1, got {self.max_tokens}")
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise _invalid(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise _invalid("stop sequences must not be empty")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user", "assistant" or "tool"
    content: str
    name: str = ""


CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    user: str = ""
    prompt_cache_key: str = ""  # requests sharing a key share a prompt prefix; a routing hint

    def validate(self) -> None:
        if not self.messages:
            raise _invalid("messages must not be empty")
        for message in self.messages:
            if message.role not in CHAT_ROLES:
                raise _invalid(f"unknown message role {message.role!r}; use one of {sorted(CHAT_ROLES)}")
        self.params.validate()


@dataclass(frozen=True, slots=True)
class CompleteRequest:
    model: str
    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    echo: bool = False
    user: str = ""
    prompt_cache_key: str = ""  # requests sharing a key share a prompt prefix; a routing hint

    def validate(self) -> None:
        if not self.prompt:
            raise _invalid("prompt must not be empty")
        self.params.validate()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, how many the node took from its prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TextChunk:
    """One piece of a streamed text answer; the last one carries ``finish_reason`` and ``usage``."""

    request_id: str
    delta: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    node_id: str = ""
    model: str = ""
    created: int = 0  # unix seconds when the request started


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    model: str
    input: tuple[str, ...]
    request_id: str = ""
    dimensions: int | None = None
    user: str = ""

    def validate(self) -> None:
        if not self.input:
            raise _invalid("input must not be empty")
        if any(not text for text in self.input):
            raise _invalid("input strings must not be empty")
        if self.dimensions is not None and self.dimensions < 1:
            raise _invalid(f"dimensions must be at least 1, got {self.dimensions}")


@dataclass(frozen=True, slots=True)
class EmbedResponse:
    model: str
    data: tuple[tuple[float, ...], ...]  # one vector per input, in input order
    usage: Usage
    node_id: str = ""


@dataclass(frozen=True, slots=True)
class TranscribeRequest:
    model: str
    audio: bytes
    filename: str = ""
    language: str = ""  # ISO-639-1; empty: detected
    prompt: str = ""
    temperature: float | None = None
    request_id: str = ""

    def validate(self) -> None:
        if not self.audio:
            raise _invalid("audio must not be empty")
        if self.language and not (2 <= len(self.language) <= 3 and self.language.isalpha()):
            raise _invalid(f"language must be an ISO-639-1 code such as 'en', got {self.language!r}")
        _check_range("temperature", self.temperature, 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class TranscriptSegment:
    id: int  # 0-based position in Transcript.segments
    start: float  # seconds
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 0.0
    temperature: float = 0.0
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Transcript:
    """Structured transcription; ``common.transcript_formats`` renders text / srt / vtt / JSON from it."""

    text: str
    language: str
    duration: float
    segments: tuple[TranscriptSegment, ...] = ()
    node_id: str = ""


class AudioFormat(enum.StrEnum):
    WAV = "wav"  # RIFF header in the first chunk, then samples
    PCM = "pcm"  # raw little-endian signed 16-bit samples


@dataclass(frozen=True, slots=True)
class SpeakRequest:
    model: str
    input: str
    voice: str = ""
    format: AudioFormat = AudioFormat.WAV
    speed: float | None = None
    request_id: str = ""

    def validate(self) -> None:
        if not self.input.strip():
            raise _invalid("input must not be empty")
        if len(self.input) > SPEECH_MAX_INPUT_CHARS:
            raise _invalid(f"input has {len(self.input)} characters; the limit is {SPEECH_MAX_INPUT_CHARS}")
        _check_range("speed", self.speed, 0.25, 4.0)


@dataclass(frozen=True, slots=True)
class AudioChunk:
    data: bytes
    sample_rate: int
    channels: int = 1
    sample_width: int = 2  # bytes per sample
    format: AudioFormat = AudioFormat.WAV
    last: bool = False


class ImageOperation(enum.StrEnum):
    GENERATE = "generate"
    EDIT = "edit"
    VARIATION = "variation"


@dataclass(frozen=True, slots=True)
class GenerateImageRequest:
    model: str
    prompt: str = ""
    operation: ImageOperation = ImageOperation.GENERATE
    negative_prompt: str = ""
    n: int = 1
    width: int = 0  # 0: the model's default
    height: int = 0
    steps: int = 0
    cfg_scale: float | None = None
    seed: int | None = None
    image: bytes = b""  # PNG input for edit / variation
    mask: bytes = b""  # PNG mask for edit
    request_id: str = ""

    def validate(self) -> None:
        if self.operation is not ImageOperation.VARIATION and not self.prompt:
            raise _invalid("prompt must not be empty")
        if self.operation is not ImageOperation.GENERATE and not self.image:
            raise _invalid(f"{self.operation.value} needs an input image")
        if not 1 <= self.n <= 10:
            raise _invalid(f"n must be between 1 and 10, got {self.n}")
        for name, value in (("width", self.width), ("height", self.height)):
            if value and (value < 64 or value > 2048 or value % 64):
                raise _invalid(f"{name} must be a multiple of 64 between 64 and 2048, got {value}")
        if self.steps < 0 or self.steps > 150:
            raise _invalid(f"steps must be between 1 and 150, got {self.steps}")


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    png: bytes
    seed: int
    revised_prompt: str = ""


@dataclass(frozen=True, slots=True)
class GenerateImageResponse:
    images: tuple[GeneratedImage, ...]
    node_id: str = ""
