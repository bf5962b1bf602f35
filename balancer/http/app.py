"""The HTTP shim's ASGI app: OpenAI-compatible ``/v1``, management ``/v0``, probes, metrics and the
operator's console (``/ui``).

It converts OpenAI JSON to the internal types and calls the same router the gRPC ``Inference``
servicer calls; nothing here routes, retries or stores.
"""

from __future__ import annotations

from fastapi import FastAPI

from balancer.console import console_routes
from balancer.http.deployment_routes import deployment_routes
from balancer.http.docs_routes import docs_routes
from balancer.http.errors import Unexpected, install_error_handlers
from balancer.http.guard import guard
from balancer.http.key_routes import key_routes
from balancer.http.limits import BodyLimit
from balancer.http.management_routes import management_routes
from balancer.http.openai_routes import openai_routes
from balancer.http.probes import probe_routes
from balancer.http.route_table import served
from balancer.parts import BalancerParts


def create_app(parts: BalancerParts) -> FastAPI:
    """The shim for one running balancer; serve it with ``balancer.http.serving.start_http``."""
    # Plain Starlette routes, one per row of the route table: the endpoints parse their own bodies, and
    # skip per-request dependency solving. Every route behind its row's access rule.
    handlers = (
        openai_routes(parts),
        management_routes(parts),
        deployment_routes(parts),
        key_routes(parts),
        probe_routes(parts),
        console_routes(),
        docs_routes(),
    )
    routes = guard(served(handlers), parts.keys)
    app = FastAPI(title="llmlb", routes=routes, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    # Added last runs first: the size limit sees the request before anything reads its body.
    app.add_middleware(Unexpected)
    app.add_middleware(BodyLimit, limit=parts.config.max_body_mb * 1024 * 1024)
    return app
