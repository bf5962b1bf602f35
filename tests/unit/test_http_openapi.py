"""One route table makes the app's routes, its access rules and its OpenAPI document; /docs works offline."""

from __future__ import annotations

import re
from typing import Any

import pytest
import schemathesis
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from balancer.http.app import create_app
from balancer.http.openapi import openapi_path
from balancer.http.route_table import HTTP_ACCESS, ROUTES, served
from tests.unit import test_http_app
from tests.unit.test_http_app import Shim

shim = test_http_app.shim  # the in-process shim on a balancer's real parts


def served_routes(shim: Shim) -> set[tuple[str, str]]:
    app = create_app(shim.parts)
    return {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }


async def test_every_served_route_has_an_access_rule_and_an_operation_and_nothing_else_does(
    shim: Shim,
) -> None:
    routes = served_routes(shim)
    rows = {(row.method, row.path) for row in ROUTES}
    assert len(rows) == len(ROUTES), "two rows declare the same method and path"
    assert routes == rows, "the app serves exactly the table's rows"
    assert set(HTTP_ACCESS) == routes, "every route has an access rule and the rules name no other"
    doc = (await shim.client.get("/openapi.json")).json()
    described = {(m.upper(), p) for p, methods in doc["paths"].items() for m in methods}
    assert described == {(m, openapi_path(p)) for m, p in routes}, (
        "the document describes every route, no other"
    )


async def endpoint(request: Request) -> Response:
    return Response("never served")


def test_a_handler_no_row_routes_stops_the_app_from_being_built() -> None:
    every = [{row.handler: endpoint for row in ROUTES}]
    assert len(served(every)) == len(ROUTES)
    with pytest.raises(ValueError, match="no route table row names"):
        served([*every, {"unrouted": endpoint}])


def test_a_row_without_its_handler_stops_the_app_from_being_built() -> None:
    with pytest.raises(ValueError, match="nobody provides"):
        served([{row.handler: endpoint for row in ROUTES[1:]}])
    with pytest.raises(ValueError, match="two HTTP handlers"):
        served([{ROUTES[0].handler: endpoint}, {row.handler: endpoint for row in ROUTES}])


def refs(value: Any) -> set[str]:
    if isinstance(value, dict):
        found = {value["$ref"]} if isinstance(value.get("$ref"), str) else set()
        return found.union(*(refs(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(refs(v) for v in value))
    return set()


async def test_openapi_json_is_public_complete_and_loads_as_openapi(shim: Shim) -> None:
    answer = await shim.client.get("/openapi.json")
    assert answer.status_code == 200
    doc = answer.json()
    assert doc["openapi"].startswith("3.1")
    described = {(m.upper(), p) for p, methods in doc["paths"].items() for m in methods}
    assert described == {(m, openapi_path(p)) for m, p in served_routes(shim)}
    schemas = doc["components"]["schemas"]
    for target in refs(doc):
        assert target.removeprefix("#/components/schemas/") in schemas, target
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearer": []}]
    assert {"200", "400", "401", "403", "404", "413", "429", "503"} <= set(chat["responses"])
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    for status in ("400", "401", "403", "404", "413", "429", "503"):  # each refusal in the error shape
        assert chat["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
    assert {"message", "type", "code"} <= set(schemas["ErrorDetail"]["required"])
    assert "422" not in chat["responses"] and "HTTPValidationError" not in schemas
    assert "messages" in schemas["ChatCompletionBody"]["properties"]
    assert "input" in schemas["ResponseCreateBody"]["properties"]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    # schemathesis accepts it, with an operation per described route and method.
    assert len(list(schemathesis.openapi.from_dict(doc).get_all_operations())) == len(described)


async def test_docs_page_is_public_and_loads_nothing_from_elsewhere(shim: Shim) -> None:
    answer = await shim.client.get("/docs")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    page = answer.text
    assert 'fetch("/openapi.json")' in page
    assert re.search(r"(src|href)=[\"']?(https?:)?//", page) is None
