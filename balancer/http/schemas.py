"""OpenAI request bodies (and the /v0 management ones) as pydantic models: the HTTP door's parsing only.

Strict types like OpenAI's (a number is not a string, ``"1"`` is not a number); unknown fields in
OpenAI bodies are ignored the way OpenAI ignores harmless extras, while a management body refuses
them: a misspelt limit or count must not be accepted and silently do nothing. Conversion to internal
types is in ``openai_requests``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _ManagementBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class TextPart(_Body):
    type: str
    text: str | None = None


class FunctionCallBody(_Body):
    name: str
    arguments: str = ""


class ToolCallBody(_Body):
    id: str = ""
    type: str = "function"
    function: FunctionCallBody


class ChatMessageBody(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None


class FunctionBody(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolBody(_Body):
    type: str
    function: FunctionBody


class NamedToolChoice(_Body):
    type: str
    function: FunctionCallBody | None = None


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolBody] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None  # legacy: how many alternatives per position (0..5); set: log-probabilities
    best_of: int | None = None
    suffix: str | None = None
    response_format: dict[str, Any] | None = None


class EmbeddingBody(_Body):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None


class SpeechBody(_Body):
    model: str
    input: str
    voice: str | None = None
    response_format: str | None = None
    speed: float | None = None
    stream_format: str | None = None


class ImageGenerationBody(_Body):
    model: str
    prompt: str
    n: int | None = None
    size: str | None = None
    response_format: str | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    user: str | None = None


class RegisterModelBody(_ManagementBody):
    """``POST /v0/models``: register a model from a Hugging Face repository, pinned to a commit."""

    repo_id: str
    filename: str = ""
    revision: str = ""
    model_id: str = ""
    origin: str = ""
    name: str = ""
    capabilities: list[str] = []
    tags: list[str] = []
    required_vram_mb: int = 0
    chat_template: str = ""


class PullModelBody(_ManagementBody):
    """``POST /v0/models/{id}/pull``: the nodes to fetch and load the model (none: every capable node)."""

    node_ids: list[str] = []


class DeploymentBody(_ManagementBody):
    """``PUT /v0/models/{id}/deployment``: a fixed ``copies``, or ``min_copies``..``max_copies`` scaled
    on demand (neither: one copy); ``selector``: node labels every copy's node must have;
    ``memory_mb``: overrides the model's memory need."""

    copies: int | None = None
    min_copies: int = 0
    max_copies: int | None = None
    selector: dict[str, str] = {}
    memory_mb: int | None = None


class CreateKeyBody(_ManagementBody):
    """``POST /v0/keys``: a new API key with a name and its scopes (``api``, ``node``, ``admin``);
    ``node_id`` binds a node key to the one node id it may register."""

    name: str = ""
    scopes: list[str]
    node_id: str = ""
    # Limits (``common.types.KeyLimits``): 0 or absent is no limit; no models, every model.
    rpm: int = 0
    tpm: int = 0
    max_parallel: int = 0
    daily_tokens: int = 0
    monthly_tokens: int = 0
    models: list[str] = []


class UpdateKeyBody(_ManagementBody):
    """``PATCH /v0/keys/{key}``: the limits given change (0, or ``[]`` for models, clears one); the
    others stay."""

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    models: list[str] | None = None
