"""The OpenAI-compatible routes under ``/v1``: each inference route a row of parser, plane and encoder.

A row names the kind of call (``balancer.edge.plane``), the parser that reads the HTTP request into
the plane's request (``openai_requests``, ``responses_requests``) and the encoder that writes the
plane's answer as the HTTP answer (``openai_answers``, ``responses_answers``). Every inference endpoint is
the same one line: ``InferencePlane.answer``, which admits, limits, counts, traces and routes, the same
path the gRPC door takes. A streamed answer whose error comes before its first chunk is a plain JSON
error with its status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from balancer import control
from balancer.edge.deadline import REQUEST_TIMEOUT_HEADER, header_timeout
from balancer.edge.plane import (
    CHAT,
    COMPLETE,
    EMBED,
    IMAGE,
    RESPONSES,
    SPEAK,
    TRANSCRIBE,
    Answer,
    Asked,
    Door,
    InferencePlane,
    Kind,
)
from balancer.http import openai_answers as out
from balancer.http import openai_requests as cv
from balancer.http.resources import deleted_json, openai_model_json, openai_model_list_json
from balancer.http.responses_answers import response_answer
from balancer.http.responses_requests import response
from balancer.http.route_table import Endpoint, Handlers
from balancer.http.streaming import Disconnect
from balancer.parts import BalancerParts
from common import tracing
from common.inference import ImageOperation

T = TypeVar("T")
C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Inference(Generic[T, C]):
    """One inference route: its kind of call, its parser and its encoder."""

    kind: Kind[Any, T]
    parse: Callable[[Request], Awaitable[Asked[Any, C]]]
    encode: Callable[[Answer[Any, T, C]], Response]


INFERENCE: dict[str, Inference[Any, Any]] = {  # handler name (``route_table``) -> its row
    "chat_completions": Inference(CHAT, cv.chat, out.text_answer(chat=True)),
    "completions": Inference(COMPLETE, cv.completion, out.text_answer(chat=False)),
    "create_response": Inference(RESPONSES, response, response_answer),
    "embeddings": Inference(EMBED, cv.embedding, out.embeddings_answer),
    "transcriptions": Inference(TRANSCRIBE, cv.transcription, out.transcript_answer),
    "speech": Inference(SPEAK, cv.speech, out.speech_answer),
    "image_generations": Inference(IMAGE, cv.image_generation, out.images_answer),
    "image_edits": Inference(IMAGE, cv.image_form(ImageOperation.EDIT), out.images_answer),
    "image_variations": Inference(IMAGE, cv.image_form(ImageOperation.VARIATION), out.images_answer),
}


def door(request: Request) -> Door:
    """The HTTP door of one request: its ``traceparent``, ``X-Request-Timeout`` (the gRPC deadline's
    twin, ``balancer.edge.deadline``) and the disconnect that cancels its work."""
    return Door(
        "http",
        partial(tracing.from_headers, request.headers),
        f"{request.method} {request.url.path}",
        deadline=lambda: header_timeout(request.headers.get(REQUEST_TIMEOUT_HEADER)),
        watch=Disconnect(request.receive),
    )


def _endpoint(plane: InferencePlane, name: str, route: Inference[Any, Any]) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await plane.answer(route.kind, door(request), partial(route.parse, request), route.encode)

    endpoint.__name__ = name
    return endpoint


def openai_routes(parts: BalancerParts) -> Handlers:
    """``/v1``: chat and text completions, Responses, embeddings, audio, images and models."""

    async def list_models(request: Request) -> Response:
        return out.json_response(openai_model_list_json(await control.list_models(parts)))

    async def get_model(request: Request) -> Response:
        view = await control.get_model(parts, request.path_params["model_id"])
        return out.json_response(openai_model_json(view))

    async def delete_model(request: Request) -> Response:
        deleted = await control.delete_model(parts, request.path_params["model_id"])
        return out.json_response(deleted_json(deleted))

    inference = {name: _endpoint(parts.plane, name, route) for name, route in INFERENCE.items()}
    return {**inference, "models": list_models, "model": get_model, "delete_model": delete_model}
