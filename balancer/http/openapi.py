"""The HTTP door's OpenAPI 3.1 document, written deliberately: one entry per route the app serves.

The app is plain Starlette routes (endpoints parse their own bodies), so nothing is inferred: each
operation is declared here with its access, its request body (the pydantic models of ``schemas`` and
``responses_schemas``, or a multipart form) and every answer it can give, errors included, each in its
real shape. A unit test compares ``OPERATIONS`` with the app's routes both ways, so a route added
without a description here (or a description left after its route is gone) fails the build.

This module is long because it is a table; splitting it would scatter one document over files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from balancer.edge.access import http_access
from balancer.http.responses_schemas import ResponseCreateBody
from balancer.http.schemas import (
    ChatCompletionBody,
    CompletionBody,
    CreateKeyBody,
    DeploymentBody,
    EmbeddingBody,
    ImageGenerationBody,
    PullModelBody,
    RegisterModelBody,
    SpeechBody,
    UpdateKeyBody,
)

Schema = dict[str, Any]
JSON = "application/json"
SSE = "text/event-stream"


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """An object with these keys (more may follow: answers grow fields the way OpenAI's do)."""
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}


STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}
ANY_OBJ: Schema = {"type": "object"}
NULL_STR: Schema = {"type": ["string", "null"]}
NULL_OBJ: Schema = {"type": ["object", "null"]}


def arr(items: Schema) -> Schema:
    return {"type": "array", "items": items}


# -- answer shapes -------------------------------------------------------------------------------------

_USAGE = obj({"prompt_tokens": INT, "total_tokens": INT}, {"completion_tokens": INT})
_MODEL_NODE = obj({"node_id": STR, "ready": BOOL}, {"state": STR})
_MODEL_ON_NODE = obj(
    {
        "node_id": STR,
        "model_id": STR,
        "state": STR,
        "downloaded_bytes": INT,
        "total_bytes": INT,
        "error": STR,
    },
    {"pinned": BOOL, "slots": INT},
)
_FILE = obj({"filename": STR, "format": STR, "size_bytes": INT, "sha256": STR, "backends": arr(STR)})
_NULL_TIME: Schema = {"type": ["string", "null"], "format": "date-time"}

ANSWERS: dict[str, Schema] = {
    "Error": obj(
        {"error": obj({"message": STR, "type": STR, "code": NULL_STR}, {"param": NULL_STR})},
    ),
    "ChatCompletion": obj(
        {
            "id": STR,
            "object": {"const": "chat.completion"},
            "created": INT,
            "model": STR,
            "choices": arr(
                obj(
                    {"index": INT, "message": obj({"role": STR}, {"content": NULL_STR}), "finish_reason": STR}
                )
            ),
            "usage": _USAGE,
        }
    ),
    "TextCompletion": obj(
        {
            "id": STR,
            "object": {"const": "text_completion"},
            "created": INT,
            "model": STR,
            "choices": arr(obj({"index": INT, "text": STR, "finish_reason": STR})),
            "usage": _USAGE,
        }
    ),
    "Response": obj(
        {
            "id": STR,
            "object": {"const": "response"},
            "created_at": NUM,
            "status": {"enum": ["completed", "incomplete", "in_progress", "failed"]},
            "model": STR,
            "output": arr(obj({"type": {"enum": ["message", "function_call"]}})),
        },
        {
            "usage": {
                "type": ["object", "null"],
                "required": ["input_tokens", "output_tokens", "total_tokens"],
                "properties": {"input_tokens": INT, "output_tokens": INT, "total_tokens": INT},
            },
            "incomplete_details": NULL_OBJ,
            "error": NULL_OBJ,
        },
    ),
    "EmbeddingList": obj(
        {
            "object": {"const": "list"},
            "data": arr(
                obj({"object": STR, "index": INT, "embedding": {"anyOf": [arr(NUM), {"type": "string"}]}})
            ),
            "model": STR,
            "usage": obj({"prompt_tokens": INT, "total_tokens": INT}),
        }
    ),
    "Transcription": obj({"text": STR}, {"language": STR, "duration": NUM, "segments": arr(ANY_OBJ)}),
    "Images": obj({"created": INT, "data": arr(obj({"b64_json": STR}, {"revised_prompt": STR}))}),
    "Model": obj(
        {
            "id": STR,
            "object": {"const": "model"},
            "created": INT,
            "owned_by": STR,
            "ready": BOOL,
            "nodes": arr(_MODEL_NODE),
        }
    ),
    "ModelList": obj({"object": {"const": "list"}, "data": arr(ref("Model"))}),
    "ModelDeleted": obj({"id": STR, "object": {"const": "model"}, "deleted": BOOL}),
    "ModelDetail": obj(
        {
            "id": STR,
            "object": {"const": "model"},
            "name": STR,
            "source": STR,
            "repo_id": STR,
            "revision": STR,
            "capabilities": arr(STR),
            "tags": arr(STR),
            "required_vram_mb": INT,
            "total_bytes": INT,
            "files": arr(_FILE),
            "ready": BOOL,
            "nodes": arr(_MODEL_NODE),
        },
        {"created_at": _NULL_TIME, "updated_at": _NULL_TIME, "origin": STR, "from_catalog": BOOL},
    ),
    "ModelDetailList": obj({"object": {"const": "list"}, "data": arr(ref("ModelDetail"))}),
    "Manifest": obj(
        {"model_id": STR, "repo": STR, "revision": STR, "files": arr(_FILE)}, {"created_at": _NULL_TIME}
    ),
    "ModelStatus": obj(
        {
            "model_id": STR,
            "status": STR,
            "progress": NUM,
            "downloaded_bytes": INT,
            "total_bytes": INT,
            "nodes": arr(_MODEL_ON_NODE),
        }
    ),
    "NodeList": obj(
        {
            "object": {"const": "list"},
            "data": arr(
                obj(
                    {
                        "id": STR,
                        "address": STR,
                        "state": STR,
                        "backends": arr(STR),
                        "models": arr(_MODEL_ON_NODE),
                    },
                    {"gpus": arr(ANY_OBJ), "load": NULL_OBJ, "runtimes": arr(STR), "version": STR},
                )
            ),
        }
    ),
    "Pulled": obj({"model_id": STR, "node_ids": arr(STR)}),
    "NodeDrained": obj({"id": STR, "state": STR}),
    "NodeRemoved": obj({"id": STR, "removed": BOOL}),
    "Deployment": obj(
        {
            "model_id": STR,
            "copies": {"type": ["integer", "null"]},
            "min_copies": INT,
            "max_copies": {"type": ["integer", "null"]},
            "selector": ANY_OBJ,
            "memory_mb": {"type": ["integer", "null"]},
            "desired_copies": INT,
            "ready_copies": INT,
            "nodes": arr(obj({"node_id": STR, "state": STR, "ready": BOOL})),
        },
        {"created_at": _NULL_TIME, "updated_at": _NULL_TIME},
    ),
    "DeploymentList": obj({"object": {"const": "list"}, "data": arr(ref("Deployment"))}),
    "DeploymentDeleted": obj({"model_id": STR, "deleted": BOOL}),
    "Placement": obj(
        {
            "model_id": STR,
            "target": INT,
            "active": INT,
            "nodes": arr(
                obj(
                    {"node_id": STR, "excluded": BOOL, "text": STR}, {"rule": STR, "reason": STR, "rank": INT}
                )
            ),
            "decisions": arr(obj({"at": NUM, "node_id": STR, "text": STR})),
        }
    ),
    "Events": obj(
        {
            "acting": BOOL,
            "data": arr(
                obj(
                    {
                        "at": STR,
                        "action": STR,
                        "model_id": STR,
                        "node_id": STR,
                        "reason": STR,
                        "estimate_s": {"type": ["number", "null"]},
                        "actual_s": {"type": ["number", "null"]},
                        "outcome": STR,
                    }
                )
            ),
        }
    ),
    "History": obj(
        {
            "replica": STR,
            "bucket_s": NUM,
            "series": obj({"kind": STR, "name": STR, "points": arr(ANY_OBJ)}),
            "models": arr(STR),
            "nodes": arr(STR),
        }
    ),
    "KeyLimits": obj(
        {
            "rpm": INT,
            "tpm": INT,
            "max_parallel": INT,
            "daily_tokens": INT,
            "monthly_tokens": INT,
            "models": arr(STR),
        }
    ),
    "Key": obj(
        {"id": STR, "name": STR, "prefix": STR, "scopes": arr(STR)},
        {
            "created_at": _NULL_TIME,
            "revoked_at": _NULL_TIME,
            "last_used_at": _NULL_TIME,
            "node_id": STR,
            "limits": ref("KeyLimits"),
        },
    ),
    "KeyList": obj({"object": {"const": "list"}, "data": arr(ref("Key"))}),
    "NewKey": obj(
        {"id": STR, "name": STR, "prefix": STR, "scopes": arr(STR), "secret": STR},
        {
            "created_at": _NULL_TIME,
            "revoked_at": _NULL_TIME,
            "last_used_at": _NULL_TIME,
            "node_id": STR,
            "limits": ref("KeyLimits"),
        },
    ),
    "Me": obj({"id": STR, "name": STR, "scopes": arr(STR), "replica": STR}, {"prefix": STR}),
    "Usage": obj(
        {
            "object": {"const": "list"},
            "since": STR,
            "data": arr(
                obj(
                    {
                        "key_id": STR,
                        "model": STR,
                        "minute": STR,
                        "requests": INT,
                        "errors": INT,
                        "prompt_tokens": INT,
                        "completion_tokens": INT,
                    }
                )
            ),
        }
    ),
    "Health": obj({"status": {"const": "ok"}}),
    "Ready": obj(
        {"status": {"const": "ready"}, "nodes": obj({"registered": INT, "online": INT}), "models": INT}
    ),
    "NotReady": obj({"status": {"const": "not_ready"}, "error": ANY_OBJ}),
}

# -- multipart forms -------------------------------------------------------------------------------------

_BINARY: Schema = {"type": "string", "format": "binary"}
FORMS: dict[str, Schema] = {
    "TranscriptionForm": obj(
        {"file": _BINARY, "model": STR},
        {
            "language": STR,
            "prompt": STR,
            "temperature": STR,
            "response_format": {"enum": ["json", "text", "srt", "verbose_json", "vtt"]},
        },
    ),
    "ImageEditForm": obj(
        {"image": _BINARY, "model": STR, "prompt": STR},
        {"mask": _BINARY, "n": STR, "size": STR, "response_format": STR, "seed": STR, "steps": STR},
    ),
    "ImageVariationForm": obj(
        {"image": _BINARY, "model": STR}, {"n": STR, "size": STR, "response_format": STR, "seed": STR}
    ),
}

BODIES: tuple[type[BaseModel], ...] = (
    ChatCompletionBody,
    CompletionBody,
    ResponseCreateBody,
    EmbeddingBody,
    SpeechBody,
    ImageGenerationBody,
    RegisterModelBody,
    PullModelBody,
    CreateKeyBody,
    UpdateKeyBody,
    DeploymentBody,
)

# -- operations ------------------------------------------------------------------------------------------

# Every inference route can be refused for these reasons before (or instead of) answering.
_REFUSED = (400, 401, 403, 404, 413, 429, 502, 503, 504, 507)
_READ = (401, 403, 404)
_ERROR_TEXT = {
    400: "invalid request or model id",
    401: "no, unknown or revoked API key",
    403: "the key lacks the scope, or the origin is not allowed",
    404: "model (or node) not found, or the model lacks the capability",
    409: "the node is shutting down: its drain cannot be undone",
    413: "request body over the size limit",
    429: "queue full, or the expected wait exceeds the request's time (X-Request-Timeout); see Retry-After",
    502: "the model origin failed",
    503: "no capable node is ready, or the store is not answering",
    504: "the node did not answer in time",
    507: "the node has no room for the model's files",
}


@dataclass(frozen=True, slots=True)
class Operation:
    """One route and method: what it does, what it takes and what it answers."""

    summary: str
    tag: str
    body: str = ""  # a component schema name; a "Form" one is multipart/form-data
    ok: dict[str, Schema] = field(default_factory=dict)  # media type -> schema of the success answer
    ok_status: int = 200
    errors: tuple[int, ...] = _REFUSED
    path_params: tuple[str, ...] = ()
    query_params: tuple[str, ...] = ()  # optional string parameters
    example: Schema | None = None  # a request body that works against the packaged gemma model


def _json(name: str) -> dict[str, Schema]:
    return {JSON: ref(name)}


_TEXT_STREAM = {SSE: STR}
EXAMPLE_MODEL = "gemma-3-270m"  # the catalogue's packaged text model
_PLAIN = {"text/plain": STR}

# Keyed by (method, path as the app declares it), the same keys as ``balancer.edge.access.HTTP_ACCESS``.
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/chat/completions"): Operation(
        "Chat completion (SSE with stream: true)",
        "OpenAI",
        "ChatCompletionBody",
        {**_json("ChatCompletion"), **_TEXT_STREAM},
        example={"model": EXAMPLE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
    ),
    ("POST", "/v1/completions"): Operation(
        "Text completion (SSE with stream: true)",
        "OpenAI",
        "CompletionBody",
        {**_json("TextCompletion"), **_TEXT_STREAM},
        example={"model": EXAMPLE_MODEL, "prompt": "Once upon a time", "max_tokens": 8},
    ),
    ("POST", "/v1/responses"): Operation(
        "Responses API, stateless (typed SSE events with stream: true)",
        "OpenAI",
        "ResponseCreateBody",
        {**_json("Response"), **_TEXT_STREAM},
        example={"model": EXAMPLE_MODEL, "input": "Hi", "max_output_tokens": 8},
    ),
    ("POST", "/v1/embeddings"): Operation(
        "Embeddings",
        "OpenAI",
        "EmbeddingBody",
        _json("EmbeddingList"),
        example={"model": EXAMPLE_MODEL, "input": ["Hello", "world"]},
    ),
    ("POST", "/v1/audio/transcriptions"): Operation(
        "Transcribe audio (text, srt and vtt formats answer as text)",
        "OpenAI",
        "TranscriptionForm",
        {**_json("Transcription"), **_PLAIN, "text/vtt": STR, "application/x-subrip": STR},
    ),
    ("POST", "/v1/audio/speech"): Operation(
        "Speak text (streamed audio)",
        "OpenAI",
        "SpeechBody",
        {"audio/wav": _BINARY, "audio/pcm": _BINARY},
    ),
    ("POST", "/v1/images/generations"): Operation(
        "Generate images", "OpenAI", "ImageGenerationBody", _json("Images")
    ),
    ("POST", "/v1/images/edits"): Operation("Edit an image", "OpenAI", "ImageEditForm", _json("Images")),
    ("POST", "/v1/images/variations"): Operation(
        "Variations of an image", "OpenAI", "ImageVariationForm", _json("Images")
    ),
    ("GET", "/v1/models"): Operation("List models", "OpenAI", ok=_json("ModelList"), errors=_READ),
    ("GET", "/v1/models/{model_id:path}"): Operation(
        "Get a model", "OpenAI", ok=_json("Model"), errors=(400, *_READ), path_params=("model_id",)
    ),
    ("DELETE", "/v1/models/{model_id:path}"): Operation(
        "Delete a model: every node unloads it and deletes its copy",
        "OpenAI",
        ok=_json("ModelDeleted"),
        errors=(400, *_READ, 503),
        path_params=("model_id",),
    ),
    ("POST", "/v0/models"): Operation(
        "Register a model from a Hugging Face repository",
        "Management",
        "RegisterModelBody",
        _json("ModelDetail"),
        ok_status=201,
        errors=(400, 401, 403, 404, 413, 502, 503, 507),
    ),
    ("GET", "/v0/models"): Operation(
        "List models with everything the catalogue holds",
        "Management",
        ok=_json("ModelDetailList"),
        errors=_READ,
    ),
    ("GET", "/v0/models/registry/{model_id:path}/manifest.json"): Operation(
        "A model's manifest",
        "Management",
        ok=_json("Manifest"),
        errors=(400, *_READ),
        path_params=("model_id",),
    ),
    ("GET", "/v0/models/{model_id:path}/status"): Operation(
        "A model's download status, per node",
        "Management",
        ok=_json("ModelStatus"),
        errors=(400, *_READ),
        path_params=("model_id",),
    ),
    ("GET", "/v0/nodes"): Operation("List nodes", "Management", ok=_json("NodeList"), errors=_READ),
    ("PUT", "/v0/models/{model_id:path}/deployment"): Operation(
        "Deploy a model: how many copies the scheduler keeps, and on which nodes (by label)",
        "Deployments",
        "DeploymentBody",
        _json("Deployment"),
        errors=(400, *_READ, 503),
        path_params=("model_id",),
        example={"copies": 1},
    ),
    ("GET", "/v0/models/{model_id:path}/deployment"): Operation(
        "A model's deployment with its desired and ready copies",
        "Deployments",
        ok=_json("Deployment"),
        errors=(400, *_READ, 503),
        path_params=("model_id",),
    ),
    ("DELETE", "/v0/models/{model_id:path}/deployment"): Operation(
        "Undeploy a model: its copies are unloaded, their files kept",
        "Deployments",
        ok=_json("DeploymentDeleted"),
        errors=(400, *_READ, 503),
        path_params=("model_id",),
    ),
    ("GET", "/v0/models/{model_id:path}/placement"): Operation(
        "Where the next copy of a deployed model would go: each node's score or the rule excluding it",
        "Deployments",
        ok=_json("Placement"),
        errors=(400, *_READ),
        path_params=("model_id",),
    ),
    ("GET", "/v0/deployments"): Operation(
        "Every deployment with its desired and ready copies and each copy's node and state",
        "Deployments",
        ok=_json("DeploymentList"),
        errors=(*_READ, 503),
    ),
    ("GET", "/v0/events"): Operation(
        "The scheduler's recent decisions on this replica, with their reasons",
        "Deployments",
        ok=_json("Events"),
        errors=_READ,
    ),
    ("POST", "/v0/models/{model_id:path}/pull"): Operation(
        "Pull a model to chosen nodes (none given: every online node able to serve it)",
        "Management",
        "PullModelBody",
        _json("Pulled"),
        ok_status=202,
        errors=(400, *_READ, 503),
        path_params=("model_id",),
    ),
    ("POST", "/v0/nodes/{node_id}/drain"): Operation(
        "Drain a node: no new requests; those in flight finish",
        "Management",
        ok=_json("NodeDrained"),
        errors=(*_READ, 503),
        path_params=("node_id",),
    ),
    ("POST", "/v0/nodes/{node_id}/undrain"): Operation(
        "Undrain a node: it takes new requests again (not a node shutting down: 409)",
        "Management",
        ok=_json("NodeDrained"),
        errors=(*_READ, 409, 503),
        path_params=("node_id",),
    ),
    ("DELETE", "/v0/nodes/{node_id}"): Operation(
        "Remove a node from the fleet",
        "Management",
        ok=_json("NodeRemoved"),
        errors=(*_READ, 503),
        path_params=("node_id",),
    ),
    ("GET", "/v0/history"): Operation(
        "This replica's last hour of request metrics in 10-second buckets (fleet, one model or one node)",
        "Management",
        ok=_json("History"),
        errors=(400, *_READ),
        query_params=("since", "model", "node"),
    ),
    ("GET", "/v0/keys"): Operation("List API keys", "Keys", ok=_json("KeyList"), errors=(*_READ, 503)),
    ("POST", "/v0/keys"): Operation(
        "Create an API key; the answer carries its secret, shown only this once",
        "Keys",
        "CreateKeyBody",
        _json("NewKey"),
        ok_status=201,
        errors=(400, *_READ, 503),
    ),
    ("DELETE", "/v0/keys/{key}"): Operation(
        "Revoke an API key (by id or prefix)",
        "Keys",
        ok=_json("Key"),
        errors=(*_READ, 503),
        path_params=("key",),
    ),
    ("PATCH", "/v0/keys/{key}"): Operation(
        "Change an API key's limits (by id or prefix): those given change, 0 clears one",
        "Keys",
        "UpdateKeyBody",
        _json("Key"),
        errors=(400, *_READ, 503),
        path_params=("key",),
    ),
    ("GET", "/v0/me"): Operation(
        "The calling key and the replica answering", "Keys", ok=_json("Me"), errors=_READ
    ),
    ("GET", "/v0/usage"): Operation(
        "Requests and tokens per key, model and minute (an api key: its own only)",
        "Keys",
        ok=_json("Usage"),
        errors=(400, *_READ, 503),
        query_params=("since", "key", "model"),
    ),
    ("GET", "/ui"): Operation("The operator's console (a page)", "Console", ok={"text/html": STR}, errors=()),
    ("GET", "/ui/{name}"): Operation(
        "The console's script, style sheet and page",
        "Console",
        ok={"text/html": STR, "text/javascript": STR, "text/css": STR},
        errors=(404,),
        path_params=("name",),
    ),
    ("GET", "/healthz"): Operation("Liveness: the process answers", "Probes", ok=_json("Health"), errors=()),
    ("GET", "/readyz"): Operation(
        "Readiness: the metadata store answers (503 when not)", "Probes", ok=_json("Ready"), errors=()
    ),
    ("GET", "/metrics"): Operation("Prometheus metrics", "Probes", ok={"text/plain": STR}, errors=()),
    ("GET", "/openapi.json"): Operation("This document", "Docs", ok={JSON: ANY_OBJ}, errors=()),
    ("GET", "/docs"): Operation("This document as a page", "Docs", ok={"text/html": STR}, errors=()),
}


def openapi_path(path: str) -> str:
    """A Starlette route path in OpenAPI's form: ``{model_id:path}`` -> ``{model_id}``."""
    return path.replace(":path}", "}")


def _operation(method: str, path: str, op: Operation) -> Schema:
    access = http_access(method, path)
    public = access is not None and access.public
    scopes = "" if access is None or public else " Scopes: " + ", ".join(s.value for s in access.scopes) + "."
    answers: Schema = {
        str(op.ok_status): {"description": "OK", "content": {t: {"schema": s} for t, s in op.ok.items()}}
    }
    if (method, path) == ("GET", "/readyz"):
        answers["503"] = {"description": "not ready", "content": {JSON: {"schema": ref("NotReady")}}}
    statuses = set(op.errors)
    if not public:
        statuses |= {401, 403}
    if op.body:
        statuses |= {400, 413}
    for status in sorted(statuses):
        answers[str(status)] = {
            "description": _ERROR_TEXT[status],
            "content": {JSON: {"schema": ref("Error")}},
        }
    name = openapi_path(path).strip("/").replace("/", "_").replace(".", "_")
    doc: Schema = {
        "operationId": f"{method.lower()}_{name}",
        "summary": op.summary,
        "description": op.summary + "." + scopes,
        "tags": [op.tag],
        "security": [] if public else [{"bearer": []}],
        "responses": answers,
    }
    if op.path_params:
        doc["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
            for name in op.path_params
        ]
    if op.query_params:
        doc.setdefault("parameters", []).extend(
            {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
            for name in op.query_params
        )
    if op.body:
        media = "multipart/form-data" if op.body.endswith("Form") else JSON
        content: Schema = {"schema": ref(op.body)}
        if op.example is not None:
            content["example"] = op.example
        doc["requestBody"] = {"required": True, "content": {media: content}}
    return doc


def openapi_document(version: str) -> Schema:
    """The whole document: every operation of ``OPERATIONS`` and the schemas they name."""
    _, defs = models_json_schema(
        [(model, "validation") for model in BODIES], ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, Schema] = {}
    for (method, path), op in OPERATIONS.items():
        paths.setdefault(openapi_path(path), {})[method.lower()] = _operation(method, path, op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llmlb",
            "version": version,
            "description": "OpenAI-compatible inference (/v1), management (/v0), probes and metrics.",
        },
        "paths": paths,
        "components": {
            "schemas": {**defs.get("$defs", {}), **ANSWERS, **FORMS},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An llmlb API key"}
            },
        },
    }
