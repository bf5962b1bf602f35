"""Every route and method the balancer serves has an access rule, and the rules hold on both doors.

The lists come from the running servers themselves: gRPC methods through server reflection, HTTP
routes from the app the balancer serves. Each one is called without a key (401 / UNAUTHENTICATED
unless it is open) and with a key of a scope it does not accept (403 / PERMISSION_DENIED).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from balancer.edge import access
from balancer.edge.access import GRPC_ACCESS, Access
from balancer.http.app import create_app
from balancer.http.guard import guard
from balancer.http.route_table import HTTP_ACCESS
from common.errors import ErrorCode, LlmlbError
from common.types import Scope
from tests.fixtures.doors import Doors, grpc_error, http_error, open_doors

pytestmark = pytest.mark.timeout(120)
SAMPLE_PATH_VALUE = "gemma-3-270m"


@pytest.fixture
async def doors(tmp_path: Path) -> AsyncIterator[Doors]:
    async with open_doors(tmp_path / "balancer") as opened:
        yield opened


async def served_methods(doors: Doors) -> list[tuple[str, bool, bool]]:
    """(full method name, client streams, server streams) of every method reflection lists."""
    stub = reflection_pb2_grpc.ServerReflectionStub(doors.channel)
    answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [s.name async for a in answers for s in a.list_services_response.service]
    methods = []
    pool = descriptor_pool.Default()
    for name in names:
        service = pool.FindServiceByName(name)
        for method in service.methods:
            methods.append((f"/{name}/{method.name}", method.client_streaming, method.server_streaming))
    return methods


def wrong_scope(rule: Access) -> Scope | None:
    """A scope whose key this rule must refuse (admin keys may call anything), if there is one."""
    return next((s for s in (Scope.API, Scope.NODE) if s not in rule.scopes), None)


async def call_raw(
    doors: Doors, method: str, client_streams: bool, server_streams: bool, scope: Scope | None
):
    """Calls ``method`` with an empty message, knowing nothing of its types: what the interceptor says."""
    kwargs = {"request_serializer": lambda _: b"", "response_deserializer": lambda b: b}
    metadata = doors.metadata(scope)
    if client_streams:
        stream = doors.channel.stream_stream(method, **kwargs)
        return stream(iter([b""]), timeout=5, metadata=metadata)
    if server_streams:
        return doors.channel.unary_stream(method, **kwargs)(b"", timeout=5, metadata=metadata)
    return doors.channel.unary_unary(method, **kwargs)(b"", timeout=5, metadata=metadata)


async def test_every_grpc_method_served_has_an_access_rule(doors: Doors) -> None:
    methods = await served_methods(doors)
    names = {m for m, _, _ in methods}
    assert "/llmlb.v1.Inference/Chat" in names and "/grpc.health.v1.Health/Check" in names
    assert names <= set(GRPC_ACCESS), names - set(GRPC_ACCESS)


async def test_each_grpc_method_refuses_a_missing_key_and_a_wrong_scope(doors: Doors) -> None:
    for method, client_streams, server_streams in await served_methods(doors):
        rule = GRPC_ACCESS[method]
        if rule.public:
            continue
        status, error = await grpc_error(await call_raw(doors, method, client_streams, server_streams, None))
        assert (status, error.code) == (grpc.StatusCode.UNAUTHENTICATED, ErrorCode.UNAUTHORIZED), method
        scope = wrong_scope(rule)
        if scope is not None:
            call = await call_raw(doors, method, client_streams, server_streams, scope)
            status, error = await grpc_error(call)
            assert (status, error.code) == (grpc.StatusCode.PERMISSION_DENIED, ErrorCode.FORBIDDEN), method


async def test_open_grpc_methods_answer_without_a_key(doors: Doors) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    answer = await health_pb2_grpc.HealthStub(doors.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert await served_methods(doors)  # reflection, with no key


async def test_a_grpc_method_without_a_rule_is_refused_even_to_an_admin(
    doors: Doors, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(access.GRPC_ACCESS, "/llmlb.v1.Registry/ListModels")
    call = call_raw(doors, "/llmlb.v1.Registry/ListModels", False, False, Scope.ADMIN)
    status, error = await grpc_error(await call)
    assert (status, error.code) == (grpc.StatusCode.PERMISSION_DENIED, ErrorCode.FORBIDDEN)
    assert "no access rule" in error.message


def http_routes(doors: Doors) -> list[tuple[str, str]]:
    """(method, declared path) of every route of the app the balancer serves."""
    app = create_app(doors.balancer.parts)
    found = []
    for route in app.routes:
        assert isinstance(route, Route)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            found.append((method, route.path))
    return found


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", SAMPLE_PATH_VALUE, path)


async def test_every_http_route_served_has_an_access_rule(doors: Doors) -> None:
    routes = http_routes(doors)
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/metrics") in routes
    assert set(routes) <= set(HTTP_ACCESS), set(routes) - set(HTTP_ACCESS)


async def test_each_http_route_refuses_a_missing_key_and_a_wrong_scope(doors: Doors) -> None:
    for method, path in http_routes(doors):
        rule = HTTP_ACCESS[(method, path)]
        url = concrete(path)
        if rule.public:
            answer = await doors.http.request(method, url)
            assert answer.status_code not in (401, 403), (method, path)
            continue
        status, error = http_error(await doors.http.request(method, url))
        assert (status, error.code) == (401, ErrorCode.UNAUTHORIZED), (method, path)
        scope = wrong_scope(rule)
        if scope is not None:
            status, error = http_error(await doors.http.request(method, url, headers=doors.headers(scope)))
            assert (status, error.code) == (403, ErrorCode.FORBIDDEN), (method, path)


async def test_an_http_route_without_a_rule_is_refused_even_to_an_admin(doors: Doors) -> None:
    async def secret(request: Request) -> Response:
        return Response("should never be seen")

    (route,) = guard([Route("/v1/unlisted", secret, methods=["GET"])], doors.balancer.parts.keys)
    assert isinstance(route, Route)
    request = Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/v1/unlisted",
            "headers": [(b"authorization", f"Bearer {doors.secrets[Scope.ADMIN]}".encode())],
            "query_string": b"",
        }
    )
    with pytest.raises(LlmlbError) as refused:
        await route.endpoint(request)
    assert refused.value.code is ErrorCode.FORBIDDEN
