"""The HTTP door's OpenAPI document describes exactly the routes the app serves; /docs works offline."""

from __future__ import annotations

import re
from typing import Any

import schemathesis
from starlette.routing import Route

from balancer.edge.access import HTTP_ACCESS
from balancer.http.app import create_app
from balancer.http.openapi import OPERATIONS, openapi_path
from tests.unit import test_http_app
from tests.unit.test_http_app import Shim

shim = test_http_app.shim  # the in-process shim on a balancer's real parts


def served(shim: Shim) -> set[tuple[str, str]]:
    app = create_app(shim.parts)
    return {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }


async def test_the_document_describes_every_served_route_and_nothing_else(shim: Shim) -> None:
    routes = served(shim)
    assert routes - set(OPERATIONS) == set(), "routes the document does not describe"
    assert set(OPERATIONS) - routes == set(), "operations no route serves"
    assert set(HTTP_ACCESS) == routes, "every route has an access rule and the table names no other"


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
    assert described == {(m, openapi_path(p)) for m, p in served(shim)}
    schemas = doc["components"]["schemas"]
    for target in refs(doc):
        assert target.removeprefix("#/components/schemas/") in schemas, target
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearer": []}]
    assert {"200", "400", "401", "403", "404", "429", "503"} <= set(chat["responses"])
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
