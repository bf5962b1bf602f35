"""``POST /v1/responses``: the Responses API, answered by the same router and edge as chat.

The body becomes a ``ChatRequest`` (``responses_requests``), goes through admission and metrics like
every inference call (``balancer.edge``), and its chunks become a ``response`` object or its typed
events (``responses_answers``). Nothing is stored: the API is served statelessly.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator

import structlog
from starlette.requests import Request
from starlette.responses import Response

from balancer.edge.observe import Call
from balancer.http import openai_requests as cv
from balancer.http.openai_routes import (
    SSE_HEADERS,
    door_observer,
    json_response,
    observed,
    request_id,
    request_timeout,
)
from balancer.http.responses_answers import ResponseBuilder
from balancer.http.responses_requests import echoed, response_request
from balancer.http.responses_schemas import ResponseCreateBody
from balancer.http.route_table import Handlers
from balancer.http.streaming import StreamingAnswer, closing, first_item, unless_disconnected
from balancer.parts import BalancerParts
from common.errors import ErrorCode, LlmlbError
from common.inference import FinishReason, TextChunk

log = structlog.get_logger(__name__)
ROUTE = "responses"


async def _events(
    call: Call, builder: ResponseBuilder, first: TextChunk | None, chunks: AsyncIterator[TextChunk]
) -> AsyncGenerator[bytes, None]:
    code = ErrorCode.CANCELLED.value  # unless the stream runs to its end or fails
    try:
        async with closing(chunks):
            for event in builder.start():
                yield event
            if first is not None:
                for event in _fed(call, builder, first):
                    yield event
            async for chunk in chunks:
                for event in _fed(call, builder, chunk):
                    yield event
            if not builder.finished:  # an empty answer, or one whose last chunk said nothing: it ended
                for event in builder.feed(TextChunk(builder.response_id, "", FinishReason.STOP)):
                    yield event
        code = "ok"
    except LlmlbError as err:
        code = err.code.value
        log.info("http.stream_failed", route=ROUTE, code=code, error=err.message)
        for event in builder.fail(err):
            yield event
    except Exception as exc:
        code = ErrorCode.INTERNAL.value
        log.exception("http.stream_failed", route=ROUTE, error=repr(exc))
        for event in builder.fail(LlmlbError(ErrorCode.INTERNAL, "internal error; see the server log")):
            yield event
    finally:
        call.done(code)


def _fed(call: Call, builder: ResponseBuilder, chunk: TextChunk) -> list[bytes]:
    if chunk.usage is not None:
        call.tokens(chunk.usage, chunk.node_id)
    return builder.feed(chunk)


def responses_routes(parts: BalancerParts) -> Handlers:
    """``POST /v1/responses``, behind the same access, admission and metrics as chat."""
    routing = parts.router
    observer = door_observer(parts)

    @observed(observer, ROUTE)
    async def create_response(request: Request, call: Call) -> Response:
        timeout = request_timeout(request)
        body = cv.parse_body(ResponseCreateBody, await request.body())
        internal = await observer.admit(call, response_request(body, request_id(request)))
        rid = internal.request_id  # admission gives one to a request that came without
        builder = ResponseBuilder("resp_" + rid, int(time.time()), internal.model, echoed(body))
        if not body.stream:
            chunks = await unless_disconnected(request.receive, routing.chat_whole(internal, timeout=timeout))
            last = chunks[-1] if chunks else None
            if last is not None:
                builder.model = last.model or builder.model
                builder.created_at = last.created or builder.created_at
                if last.usage is not None:
                    call.tokens(last.usage, last.node_id)
            headers = {"x-request-id": rid, "x-llmlb-node": last.node_id if last else ""}
            return json_response(builder.whole(chunks), headers)
        stream = routing.chat(internal, timeout=timeout)
        first = await first_item(stream, request.receive)
        call.first_chunk()
        if first is not None:
            builder.model = first.model or builder.model
            builder.created_at = first.created or builder.created_at
        return StreamingAnswer(
            _events(call, builder, first, stream),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, "x-request-id": rid, "x-llmlb-node": first.node_id if first else ""},
        )

    return {"create_response": create_response}
