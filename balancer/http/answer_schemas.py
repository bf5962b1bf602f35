"""The HTTP door's answers and multipart forms as pydantic models: what ``/openapi.json`` says of them.

The handlers build their JSON in ``openai_answers``, ``responses_answers`` and ``resources``; these
models only describe it (the route table names them, and the document is generated from them).
Required fields are the ones every answer carries; a field with a default may be absent. Answers may
carry more fields than these, the way OpenAI's grow, so none forbids extras.

This module is long because it is a catalogue of shapes; splitting it would scatter one vocabulary.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel


class Answer(BaseModel):
    """An answer's shape, for the document only."""


# -- errors ---------------------------------------------------------------------------------------------


class ErrorDetail(Answer):
    message: str
    type: str
    code: str | None
    param: str | None = None


class Error(Answer):
    """Every refusal and failure, in OpenAI's shape (``common.errors``)."""

    error: ErrorDetail


# -- inference ------------------------------------------------------------------------------------------


class CompletionUsage(Answer):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ChatMessage(Answer):
    role: str
    content: str | None = None


class ChatChoice(Answer):
    index: int
    message: ChatMessage
    finish_reason: str


class ChatCompletion(Answer):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class TextChoice(Answer):
    index: int
    text: str
    finish_reason: str


class TextCompletion(Answer):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: CompletionUsage


class ResponseOutput(Answer):
    type: Literal["message", "function_call"]


class ResponseUsage(Answer):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class Response(Answer):
    id: str
    object: Literal["response"]
    created_at: float
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[ResponseOutput]
    usage: ResponseUsage | None = None
    incomplete_details: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class Embedding(Answer):
    object: str
    index: int
    embedding: list[float] | str  # a string with encoding_format: base64


class EmbeddingUsage(Answer):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Answer):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Transcription(Answer):
    text: str
    language: str = ""
    duration: float = 0.0
    segments: list[dict[str, Any]] = []


class Image(Answer):
    b64_json: str
    revised_prompt: str = ""


class Images(Answer):
    created: int
    data: list[Image]


# -- models and nodes -----------------------------------------------------------------------------------


class ModelNode(Answer):
    node_id: str
    ready: bool
    state: str = ""


class Model(Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    ready: bool
    nodes: list[ModelNode]


class ModelList(Answer):
    object: Literal["list"]
    data: list[Model]


class ModelDeleted(Answer):
    id: str
    object: Literal["model"]
    deleted: bool


class ModelFile(Answer):
    filename: str
    format: str
    size_bytes: int
    sha256: str
    backends: list[str]


class ModelDetail(Answer):
    id: str
    object: Literal["model"]
    name: str
    source: str
    repo_id: str
    revision: str
    capabilities: list[str]
    tags: list[str]
    required_vram_mb: int
    total_bytes: int
    files: list[ModelFile]
    ready: bool
    nodes: list[ModelNode]
    created_at: datetime | None = None
    updated_at: datetime | None = None
    origin: str = ""
    from_catalog: bool = False


class ModelDetailList(Answer):
    object: Literal["list"]
    data: list[ModelDetail]


class Manifest(Answer):
    model_id: str
    repo: str
    revision: str
    files: list[ModelFile]
    created_at: datetime | None = None


class ModelOnNode(Answer):
    node_id: str
    model_id: str
    state: str
    downloaded_bytes: int
    total_bytes: int
    error: str
    pinned: bool = False
    slots: int = 0  # sequences the node runs at once for the model, loaded; 0: not reported


class ModelStatus(Answer):
    model_id: str
    status: str
    progress: float
    downloaded_bytes: int
    total_bytes: int
    nodes: list[ModelOnNode]


class Node(Answer):
    id: str
    address: str
    state: str
    backends: list[str]
    models: list[ModelOnNode]
    gpus: list[dict[str, Any]] = []
    load: dict[str, Any] | None = None
    runtimes: list[str] = []
    version: str = ""


class NodeList(Answer):
    object: Literal["list"]
    data: list[Node]


class Pulled(Answer):
    model_id: str
    node_ids: list[str]


class NodeDrained(Answer):
    id: str
    state: str


class NodeRemoved(Answer):
    id: str
    removed: bool


class History(Answer):
    class Series(Answer):
        kind: str
        name: str
        points: list[dict[str, Any]]

    replica: str
    bucket_s: float
    series: Series
    models: list[str]
    nodes: list[str]


# -- deployments ----------------------------------------------------------------------------------------


class DeploymentCopy(Answer):
    node_id: str
    state: str
    ready: bool


class Deployment(Answer):
    model_id: str
    copies: int | None
    min_copies: int
    max_copies: int | None
    selector: dict[str, Any]
    memory_mb: int | None
    desired_copies: int
    ready_copies: int
    nodes: list[DeploymentCopy]
    created_at: datetime | None = None
    updated_at: datetime | None = None


class DeploymentList(Answer):
    object: Literal["list"]
    data: list[Deployment]


class DeploymentDeleted(Answer):
    model_id: str
    deleted: bool


class PlacementNode(Answer):
    node_id: str
    excluded: bool
    text: str
    rule: str = ""
    reason: str = ""
    rank: int = 0


class PlacementDecision(Answer):
    at: float
    node_id: str
    text: str


class Placement(Answer):
    model_id: str
    target: int
    active: int
    nodes: list[PlacementNode]
    decisions: list[PlacementDecision]


class Event(Answer):
    at: str
    action: str
    model_id: str
    node_id: str
    reason: str
    estimate_s: float | None
    actual_s: float | None
    outcome: str


class Events(Answer):
    acting: bool
    data: list[Event]


# -- keys -----------------------------------------------------------------------------------------------


class KeyLimits(Answer):
    rpm: int
    tpm: int
    max_parallel: int
    daily_tokens: int
    monthly_tokens: int
    models: list[str]


class Key(Answer):
    id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None
    node_id: str = ""
    limits: KeyLimits | None = None


class KeyList(Answer):
    object: Literal["list"]
    data: list[Key]


class NewKey(Key):
    secret: str


class Me(Answer):
    id: str
    name: str
    scopes: list[str]
    replica: str
    prefix: str = ""


class UsageRow(Answer):
    key_id: str
    model: str
    minute: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int


class Usage(Answer):
    object: Literal["list"]
    since: str
    data: list[UsageRow]


# -- probes and the document ------------------------------------------------------------------------------


class Health(Answer):
    status: Literal["ok"]


class NodeCounts(Answer):
    registered: int
    online: int


class Ready(Answer):
    status: Literal["ready"]
    nodes: NodeCounts
    models: int


class NotReady(Answer):
    status: Literal["not_ready"]
    error: dict[str, Any]


class Document(Answer):
    """An OpenAPI document (this one)."""


# -- multipart forms --------------------------------------------------------------------------------------
# A form's values arrive as text (``openai_requests.form_int`` and friends parse them); files as bytes.


class TranscriptionForm(Answer):
    file: bytes
    model: str
    language: str = ""
    prompt: str = ""
    temperature: str = ""
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] = "json"


class ImageEditForm(Answer):
    image: bytes
    model: str
    prompt: str
    mask: bytes = b""
    n: str = ""
    size: str = ""
    response_format: str = ""
    seed: str = ""
    steps: str = ""


class ImageVariationForm(Answer):
    image: bytes
    model: str
    n: str = ""
    size: str = ""
    response_format: str = ""
    seed: str = ""
