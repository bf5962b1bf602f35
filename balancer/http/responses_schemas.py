"""The Responses API's request body (``POST /v1/responses``) as pydantic models: parsing only.

Strict types like the chat bodies in ``schemas``; unknown fields are ignored, but the fields of features
this balancer does not offer are declared so that ``responses_requests`` can refuse them by name instead
of dropping them silently.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, populate_by_name=True)


class InputContentPart(_Body):
    type: str
    text: str | None = None


class InputItem(_Body):
    """One ``input`` item: a message (``role`` + ``content``), a ``function_call`` or its output."""

    type: str | None = None  # "message" when omitted and a role is given
    role: str | None = None
    content: str | list[InputContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputContentPart] | None = None
    id: str | None = None


class TextFormat(_Body):
    type: str
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: str | None = None


class FunctionTool(_Body):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedToolChoice(_Body):
    type: str
    name: str | None = None


class ResponseCreateBody(_Body):
    """``POST /v1/responses``: text in, text (or function calls) out; stateless."""

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    stream: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    truncation: str | None = None
    service_tier: str | None = None
    # Declared only to be refused by name: they need state or features this balancer does not have.
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    reasoning: Any = None
    prompt: Any = None
    max_tool_calls: int | None = None
