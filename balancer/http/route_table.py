"""Every HTTP route the balancer serves, declared once: one row per method and path.

A row names its handler, who may call it, what it takes and what it answers. From these rows come the
app's routes (``served``), the access table ``guard`` applies (``HTTP_ACCESS``) and the OpenAPI
document (``balancer.http.openapi``), so the three cannot drift: a route has an access rule and a
description because it has a row. The handlers come from the route modules (``openai_routes`` and the
rest), each a mapping of handler name to endpoint; a row naming no handler, or a handler no row names,
stops the app from being built.

This module is long because it is a table; splitting it would scatter one list over files.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from balancer.edge.access import ADMIN, API, PUBLIC, READ, Access
from balancer.http import answer_schemas as a
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

Endpoint = Callable[[Request], Awaitable[Response]]
Handlers = Mapping[str, Endpoint]  # handler name -> endpoint, as a route module provides them

# Why a call can be refused before (or instead of) answering; every inference route may give each.
REFUSED = (400, 401, 403, 404, 413, 429, 502, 503, 504, 507)
READS = (401, 403, 404)
EXAMPLE_MODEL = "gemma-3-270m"  # the catalogue's packaged text model


@dataclass(frozen=True, slots=True)
class Row:
    """One route: method, path (as Starlette declares it), handler, access and what it takes and answers.

    ``body``: a JSON request body's model; ``form``: a multipart form's. ``answer``: the success answer's
    JSON model; ``media``: other media types the success answer comes as. ``streams``: the answer is
    sent as it is made (a JSON route then answers SSE events with ``stream: true``). ``errors``: the
    error statuses it may answer besides those its access (401, 403) and body (400, 413) imply.
    """

    method: str
    path: str
    handler: str
    access: Access
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    form: type[BaseModel] | None = None
    answer: type[BaseModel] | None = None
    media: tuple[str, ...] = ()
    status: int = 200
    errors: tuple[int, ...] = REFUSED
    streams: bool = False
    query: tuple[str, ...] = ()  # optional string parameters
    example: Mapping[str, Any] | None = None  # a request body that works against the packaged model


_TEXT = ("text/plain", "text/vtt", "application/x-subrip")

ROUTES: tuple[Row, ...] = (
    # -- OpenAI-compatible inference ------------------------------------------------------------------
    Row(
        "POST",
        "/v1/chat/completions",
        "chat_completions",
        API,
        "Chat completion (SSE with stream: true)",
        "OpenAI",
        body=ChatCompletionBody,
        answer=a.ChatCompletion,
        streams=True,
        example={"model": EXAMPLE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
    ),
    Row(
        "POST",
        "/v1/completions",
        "completions",
        API,
        "Text completion (SSE with stream: true)",
        "OpenAI",
        body=CompletionBody,
        answer=a.TextCompletion,
        streams=True,
        example={"model": EXAMPLE_MODEL, "prompt": "Once upon a time", "max_tokens": 8},
    ),
    Row(
        "POST",
        "/v1/responses",
        "create_response",
        API,
        "Responses API, stateless (typed SSE events with stream: true)",
        "OpenAI",
        body=ResponseCreateBody,
        answer=a.Response,
        streams=True,
        example={"model": EXAMPLE_MODEL, "input": "Hi", "max_output_tokens": 8},
    ),
    Row(
        "POST",
        "/v1/embeddings",
        "embeddings",
        API,
        "Embeddings",
        "OpenAI",
        body=EmbeddingBody,
        answer=a.EmbeddingList,
        example={"model": EXAMPLE_MODEL, "input": ["Hello", "world"]},
    ),
    Row(
        "POST",
        "/v1/audio/transcriptions",
        "transcriptions",
        API,
        "Transcribe audio (text, srt and vtt formats answer as text)",
        "OpenAI",
        form=a.TranscriptionForm,
        answer=a.Transcription,
        media=_TEXT,
    ),
    Row(
        "POST",
        "/v1/audio/speech",
        "speech",
        API,
        "Speak text (streamed audio)",
        "OpenAI",
        body=SpeechBody,
        media=("audio/wav", "audio/pcm"),
        streams=True,
    ),
    Row(
        "POST",
        "/v1/images/generations",
        "image_generations",
        API,
        "Generate images",
        "OpenAI",
        body=ImageGenerationBody,
        answer=a.Images,
    ),
    Row(
        "POST",
        "/v1/images/edits",
        "image_edits",
        API,
        "Edit an image",
        "OpenAI",
        form=a.ImageEditForm,
        answer=a.Images,
    ),
    Row(
        "POST",
        "/v1/images/variations",
        "image_variations",
        API,
        "Variations of an image",
        "OpenAI",
        form=a.ImageVariationForm,
        answer=a.Images,
    ),
    Row("GET", "/v1/models", "models", API, "List models", "OpenAI", answer=a.ModelList, errors=READS),
    Row(
        "GET",
        "/v1/models/{model_id:path}",
        "model",
        API,
        "Get a model",
        "OpenAI",
        answer=a.Model,
        errors=(400, *READS),
    ),
    Row(
        "DELETE",
        "/v1/models/{model_id:path}",
        "delete_model",
        ADMIN,
        "Delete a model: every node unloads it and deletes its copy",
        "OpenAI",
        answer=a.ModelDeleted,
        errors=(400, *READS, 503),
    ),
    # -- management -----------------------------------------------------------------------------------
    Row(
        "POST",
        "/v0/models",
        "register_model",
        ADMIN,
        "Register a model from a Hugging Face repository",
        "Management",
        body=RegisterModelBody,
        answer=a.ModelDetail,
        status=201,
        errors=(400, 401, 403, 404, 413, 502, 503, 507),
    ),
    Row(
        "GET",
        "/v0/models",
        "model_details",
        API,
        "List models with everything the catalogue holds",
        "Management",
        answer=a.ModelDetailList,
        errors=READS,
    ),
    Row(
        "GET",
        "/v0/models/registry/{model_id:path}/manifest.json",
        "manifest",
        API,
        "A model's manifest",
        "Management",
        answer=a.Manifest,
        errors=(400, *READS),
    ),
    Row(
        "GET",
        "/v0/models/{model_id:path}/status",
        "model_status",
        API,
        "A model's download status, per node",
        "Management",
        answer=a.ModelStatus,
        errors=(400, *READS),
    ),
    Row(
        "POST",
        "/v0/models/{model_id:path}/pull",
        "pull_model",
        ADMIN,
        "Pull a model to chosen nodes (none given: every online node able to serve it)",
        "Management",
        body=PullModelBody,
        answer=a.Pulled,
        status=202,
        errors=(400, *READS, 503),
    ),
    Row("GET", "/v0/nodes", "nodes", READ, "List nodes", "Management", answer=a.NodeList, errors=READS),
    # Deployments: changed by admins; read, explained and followed by api keys like model status.
    Row(
        "PUT",
        "/v0/models/{model_id:path}/deployment",
        "put_deployment",
        ADMIN,
        "Deploy a model: how many copies the scheduler keeps, and on which nodes (by label)",
        "Deployments",
        body=DeploymentBody,
        answer=a.Deployment,
        errors=(400, *READS, 503),
        example={"copies": 1},
    ),
    Row(
        "GET",
        "/v0/models/{model_id:path}/deployment",
        "get_deployment",
        API,
        "A model's deployment with its desired and ready copies",
        "Deployments",
        answer=a.Deployment,
        errors=(400, *READS, 503),
    ),
    Row(
        "DELETE",
        "/v0/models/{model_id:path}/deployment",
        "delete_deployment",
        ADMIN,
        "Undeploy a model: its copies are unloaded, their files kept",
        "Deployments",
        answer=a.DeploymentDeleted,
        errors=(400, *READS, 503),
    ),
    Row(
        "GET",
        "/v0/models/{model_id:path}/placement",
        "placement",
        API,
        "Where the next copy of a deployed model would go: each node's score or the rule excluding it",
        "Deployments",
        answer=a.Placement,
        errors=(400, *READS),
    ),
    Row(
        "GET",
        "/v0/deployments",
        "deployments",
        API,
        "Every deployment with its desired and ready copies and each copy's node and state",
        "Deployments",
        answer=a.DeploymentList,
        errors=(*READS, 503),
    ),
    Row(
        "GET",
        "/v0/events",
        "events",
        API,
        "The scheduler's recent decisions on this replica, with their reasons",
        "Deployments",
        answer=a.Events,
        errors=READS,
    ),
    Row(
        "POST",
        "/v0/nodes/{node_id}/drain",
        "drain_node",
        ADMIN,
        "Drain a node: no new requests; those in flight finish",
        "Management",
        answer=a.NodeDrained,
        errors=(*READS, 503),
    ),
    Row(
        "POST",
        "/v0/nodes/{node_id}/undrain",
        "undrain_node",
        ADMIN,
        "Undrain a node: it takes new requests again (not a node shutting down: 409)",
        "Management",
        answer=a.NodeDrained,
        errors=(*READS, 409, 503),
    ),
    Row(
        "DELETE",
        "/v0/nodes/{node_id}",
        "remove_node",
        ADMIN,
        "Remove a node from the fleet",
        "Management",
        answer=a.NodeRemoved,
        errors=(*READS, 503),
    ),
    # Fleet-wide request metrics: operators only.
    Row(
        "GET",
        "/v0/history",
        "history",
        ADMIN,
        "This replica's last hour of request metrics in 10-second buckets (fleet, one model or one node)",
        "Management",
        answer=a.History,
        errors=(400, *READS),
        query=("since", "model", "node"),
    ),
    # -- keys: managed by admins; any api key may ask who it is and read its own usage (the handler
    # narrows a non-admin key to its own rows) -------------------------------------------------------
    Row("GET", "/v0/keys", "keys", ADMIN, "List API keys", "Keys", answer=a.KeyList, errors=(*READS, 503)),
    Row(
        "POST",
        "/v0/keys",
        "create_key",
        ADMIN,
        "Create an API key; the answer carries its secret, shown only this once",
        "Keys",
        body=CreateKeyBody,
        answer=a.NewKey,
        status=201,
        errors=(400, *READS, 503),
    ),
    Row(
        "DELETE",
        "/v0/keys/{key}",
        "revoke_key",
        ADMIN,
        "Revoke an API key (by id or prefix)",
        "Keys",
        answer=a.Key,
        errors=(*READS, 503),
    ),
    Row(
        "PATCH",
        "/v0/keys/{key}",
        "update_key",
        ADMIN,
        "Change an API key's limits (by id or prefix): those given change, 0 clears one",
        "Keys",
        body=UpdateKeyBody,
        answer=a.Key,
        errors=(400, *READS, 503),
    ),
    Row(
        "GET",
        "/v0/me",
        "me",
        API,
        "The calling key and the replica answering",
        "Keys",
        answer=a.Me,
        errors=READS,
    ),
    Row(
        "GET",
        "/v0/usage",
        "usage",
        API,
        "Requests and tokens per key, model and minute (an api key: its own only)",
        "Keys",
        answer=a.Usage,
        errors=(400, *READS, 503),
        query=("since", "key", "model"),
    ),
    # -- open: the console's page and scripts are static and data-free (every datum it shows comes
    # from the routes above, with the signed-in key); probes; the door's own description -------------
    Row(
        "GET",
        "/ui",
        "console_page",
        PUBLIC,
        "The operator's console (a page)",
        "Console",
        media=("text/html",),
        errors=(),
    ),
    Row(
        "GET",
        "/ui/{name}",
        "console_asset",
        PUBLIC,
        "The console's script, style sheet and page",
        "Console",
        media=("text/html", "text/javascript", "text/css"),
        errors=(404,),
    ),
    Row(
        "GET",
        "/healthz",
        "healthz",
        PUBLIC,
        "Liveness: the process answers",
        "Probes",
        answer=a.Health,
        errors=(),
    ),
    Row(
        "GET",
        "/readyz",
        "readyz",
        PUBLIC,
        "Readiness: the metadata store answers (503 when not)",
        "Probes",
        answer=a.Ready,
        errors=(),
    ),
    Row(
        "GET", "/metrics", "metrics", PUBLIC, "Prometheus metrics", "Probes", media=("text/plain",), errors=()
    ),
    Row(
        "GET", "/openapi.json", "openapi_json", PUBLIC, "This document", "Docs", answer=a.Document, errors=()
    ),
    Row("GET", "/docs", "docs", PUBLIC, "This document as a page", "Docs", media=("text/html",), errors=()),
)

# (HTTP method, route path as declared) -> access, for ``balancer.http.guard.guard``. HEAD follows GET.
HTTP_ACCESS: dict[tuple[str, str], Access] = {(row.method, row.path): row.access for row in ROUTES}


def http_access(method: str, path: str) -> Access | None:
    """The access rule of a declared HTTP route; None when no row declares it."""
    return HTTP_ACCESS.get(("GET" if method == "HEAD" else method, path))


def served(handlers: Iterable[Handlers], *, complete: bool = True) -> list[Route]:
    """A plain route per row, its endpoint taken from ``handlers`` by the row's handler name.

    Raises ``ValueError`` when a name is provided twice, when a handler is provided that no row names,
    or (``complete``, as the app is built) when a row names a handler nobody provides; not
    ``complete`` serves only the rows whose handlers are given, for a part of the app alone.
    """
    endpoints: dict[str, Endpoint] = {}
    for group in handlers:
        for name, endpoint in group.items():
            if name in endpoints:
                raise ValueError(f"two HTTP handlers are named {name}")
            endpoints[name] = endpoint
    missing = [row.handler for row in ROUTES if row.handler not in endpoints]
    if missing and complete:
        raise ValueError(f"route table rows name handlers nobody provides: {missing}")
    unrouted = set(endpoints) - {row.handler for row in ROUTES}
    if unrouted:
        raise ValueError(f"HTTP handlers no route table row names: {sorted(unrouted)}")
    return [
        Route(row.path, endpoints[row.handler], methods=[row.method], name=row.handler)
        for row in ROUTES
        if row.handler in endpoints
    ]
