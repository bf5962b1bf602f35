"""``POST /v1/responses``: the Responses API, answered by the same inference plane as chat.

The body becomes a ``ChatRequest`` (``responses_requests``), goes through the plane like every
inference call (``balancer.edge.plane``), and its chunks become a ``response`` object or its typed
events (``responses_answers``). Nothing is stored: the API is served statelessly.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from balancer.edge.plane import RESPONSES
from balancer.http import openai_requests as cv
from balancer.http.openai_routes import SSE_HEADERS, answer_headers, door, json_response, request_id
from balancer.http.responses_answers import ResponseBuilder
from balancer.http.responses_requests import echoed, response_request
from balancer.http.responses_schemas import ResponseCreateBody
from balancer.http.route_table import Handlers
from balancer.http.streaming import StreamingAnswer, encoded
from balancer.parts import BalancerParts
from common.inference import FinishReason, TextChunk


def responses_routes(parts: BalancerParts) -> Handlers:
    """``POST /v1/responses``, behind the same access and plane as chat."""
    plane = parts.plane

    async def create_response(request: Request) -> Response:
        async with plane.open(RESPONSES, door(request)) as exchange:
            body = cv.parse_body(ResponseCreateBody, await request.body())
            internal = response_request(body, request_id(request))
            answer = await exchange.stream(internal) if body.stream else None
            chunks = [] if answer is not None else await exchange.whole(internal)
            shown = answer.first if answer is not None else (chunks[-1] if chunks else None)
            builder = ResponseBuilder(
                "resp_" + exchange.request_id, int(time.time()), exchange.model, echoed(body)
            )
            if shown is not None:
                builder.model = shown.model or builder.model
                builder.created_at = shown.created or builder.created_at
            headers = answer_headers(exchange, shown.node_id if shown else "")
            if answer is None:
                return json_response(builder.whole(chunks), headers)

            def end() -> list[bytes]:  # an empty answer, or one whose last chunk said nothing: it ended
                return (
                    []
                    if builder.finished
                    else builder.feed(TextChunk(builder.response_id, "", FinishReason.STOP))
                )

            events = encoded(answer, builder.feed, builder.fail, start=builder.start(), end=end)
            return StreamingAnswer(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    return {"create_response": create_response}
