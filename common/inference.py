"""Inference requests and answers as plain dataclasses, shared by the node runtimes and the balancer's router.

Protobuf conversion lives in ``common.inference_pb``; the HTTP shim converts OpenAI JSON to the same types.
``validate()`` on a request checks what every door must refuse with ``invalid_request``.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Protocol

from common.errors import ErrorCode, LlmlbError
from common.json_schema_check import check_schema, parse_schema

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 8  # n: more choices per request would hold one node's slot for too long
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
INT32_MAX = 2**31 - 1  # the wire's int32 fields (max_tokens, dimensions)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the wire's int64 fields (seeds)
SPEECH_MAX_INPUT_CHARS = 4096  # OpenAI's limit for /v1/audio/speech
MAX_TOOLS = 128  # OpenAI's limit
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


class InferenceRequest(Protocol):
    """What every inference request has: the model it names, its id, and its own checks."""

    @property
    def model(self) -> str: ...

    @property
    def request_id(self) -> str: ...

    def validate(self) -> None: ...


def _invalid(message: str) -> LlmlbError:
    return LlmlbError(ErrorCode.INVALID_REQUEST, message)


def _check_seed(seed: int | None) -> None:
    if seed is not None and not INT64_MIN <= seed <= INT64_MAX:
        raise _invalid(f"seed must be a 64-bit integer, got {seed}")


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and (math.isnan(value) or not low <= value <= high):
        raise _invalid(f"{name} must be between {low:g} and {high:g}, got {value:g}")


class FinishReason(enum.StrEnum):
    """Why a stream ended; set on its last chunk only."""

    STOP = "stop"  # end of text or a stop sequence
    LENGTH = "length"  # max_tokens or the context window reached
    CANCELLED = "cancelled"  # the caller went away
    TOOL_CALLS = "tool_calls"  # the model called one or more tools


class ResponseFormatType(enum.StrEnum):
    """What ``ResponseFormat`` asks of the answer's text."""

    TEXT = "text"  # free text
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # JSON valid against ``ResponseFormat.schema``


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """The shape the answer's text must have, enforced while sampling."""

    type: ResponseFormatType = ResponseFormatType.TEXT
    schema: str = ""  # JSON_SCHEMA: the JSON Schema as JSON text
    name: str = ""  # OpenAI's json_schema.name; informational
    strict: bool = False  # OpenAI's json_schema.strict; the schema is always enforced here

    def validate(self) -> None:
        """``invalid_request`` when the schema is missing, not JSON, or not enforceable while sampling."""
        if self.type is ResponseFormatType.JSON_SCHEMA:
            if not self.schema:
                raise _invalid("response_format.json_schema: the schema is missing")
            where = "response_format.json_schema"
            check_schema(parse_schema(self.schema, where), where)


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
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    logprobs: bool = False  # each generated token's log-probability on the chunks
    top_logprobs: int = 0  # and the likeliest alternatives at each position (needs logprobs)
    n: int = 1  # choices to generate

    def validate(self) -> None:
        if self.max_tokens is not None and not 1 <= self.max_tokens <= INT32_MAX:
            raise _invalid(f"max_tokens must be between 1 and {INT32_MAX}, got {self.max_tokens}")
        _check_seed(self.seed)
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise _invalid(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise _invalid("stop sequences must not be empty")
        if not 1 <= self.n <= MAX_CHOICES:
            raise _invalid(f"n must be between 1 and {MAX_CHOICES}, got {self.n}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise _invalid(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise _invalid("top_logprobs needs logprobs to be true")
        self.response_format.validate()


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call."""

    name: str
    description: str = ""
    parameters: str = ""  # JSON Schema of the arguments as JSON text; empty: no arguments
    strict: bool = False  # OpenAI's flag; arguments are always constrained to the schema here


class ToolChoiceMode(enum.StrEnum):
    AUTO = "auto"  # the model decides between text and tool calls
    NONE = "none"  # text only; tools are not offered
    REQUIRED = "required"  # at least one tool call
    FUNCTION = "function"  # exactly a call of ``ToolChoice.function``


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """Whether, and which, tool the model must call."""

    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    function: str = ""  # FUNCTION: the function's name


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: whole in a history message; a piece of one in a streamed chunk."""

    index: int = 0  # position among one answer's calls
    id: str = ""  # "call_..."; in a stream, on the call's first piece only
    name: str = ""  # in a stream, on the call's first piece only
    arguments: str = ""  # JSON text of the arguments; in a stream, the next piece of it


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: bytes = b""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability and, when asked for, the likeliest alternatives."""

    token: str
    logprob: float
    bytes: bytes = b""
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user", "assistant" or "tool"
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()  # role "assistant": the calls it made
    tool_call_id: str = ""  # role "tool": the call this message answers


CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    user: str = ""
    prompt_cache_key: str = ""  # requests sharing a key share a prompt prefix; a routing hint
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True  # False: at most one call per answer

    def validate(self) -> None:
        if not self.messages:
            raise _invalid("messages must not be empty")
        for message in self.messages:
            if message.role not in CHAT_ROLES:
                raise _invalid(f"unknown message role {message.role!r}; use one of {sorted(CHAT_ROLES)}")
        self.params.validate()
        _check_tools(self)


def _check_tools(request: ChatRequest) -> None:
    """The tools offered, the choice among them and the calls in the history make sense together."""
    if len(request.tools) > MAX_TOOLS:
        raise _invalid(f"at most {MAX_TOOLS} tools, got {len(request.tools)}")
    names: set[str] = set()
    for i, tool in enumerate(request.tools):
        if TOOL_NAME.fullmatch(tool.name) is None:
            raise _invalid(
                f"tools.{i}.function.name {tool.name[:80]!r} must be 1 to 64 letters, digits, '_' or '-'"
            )
        if tool.name in names:
            raise _invalid(f"tools.{i}.function.name {tool.name!r} is given twice")
        names.add(tool.name)
        if tool.parameters:
            where = f"tools.{i}.function.parameters"
            schema = parse_schema(tool.parameters, where)
            if not isinstance(schema, dict) or schema.get("type", "object") != "object":
                raise _invalid(f"{where} must be a JSON Schema of type 'object'")
            check_schema(schema, where)
    choice = request.tool_choice
    if choice.mode is ToolChoiceMode.FUNCTION and choice.function not in names:
        raise _invalid(f"tool_choice names the function {choice.function[:80]!r}, which is not in tools")
    if choice.mode is ToolChoiceMode.REQUIRED and not request.tools:
        raise _invalid("tool_choice 'required' needs at least one tool")
    for i, message in enumerate(request.messages):
        if message.role == "tool" and not message.tool_call_id:
            raise _invalid(f"messages.{i}: a 'tool' message needs tool_call_id")
        if message.tool_calls and message.role != "assistant":
            raise _invalid(f"messages.{i}: only 'assistant' messages carry tool_calls")
        for call in message.tool_calls:
            if not call.name:
                raise _invalid(f"messages.{i}.tool_calls.{call.index}: the function name is missing")


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
        if self.echo and self.params.logprobs:
            raise _invalid("echo with logprobs is not supported: prompt tokens get no log-probabilities here")
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
    """One piece of a streamed text answer.

    Each choice's last chunk carries its ``finish_reason``; the stream's very last chunk carries the
    ``usage`` of all choices (with n = 1: one chunk carries both).
    """

    request_id: str
    delta: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    node_id: str = ""
    model: str = ""
    created: int = 0  # unix seconds when the request started
    index: int = 0  # which choice (0 unless n > 1); each choice's last chunk has its finish_reason
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token behind ``delta`` when logprobs were asked for
    tool_calls: tuple[ToolCall, ...] = ()  # pieces of tool calls


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
        if self.dimensions is not None and not 1 <= self.dimensions <= INT32_MAX:
            raise _invalid(f"dimensions must be between 1 and {INT32_MAX}, got {self.dimensions}")


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
    """Structured transcription; the HTTP door renders it as text, srt, vtt or JSON (its response_format)."""

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
        _check_seed(self.seed)


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    png: bytes
    seed: int
    revised_prompt: str = ""


@dataclass(frozen=True, slots=True)
class GenerateImageResponse:
    images: tuple[GeneratedImage, ...]
    node_id: str = ""
