"""``/ui`` and ``/ui/{name}``: the console's page and assets, from the package's ``static`` folder.

Only the files present at start are served (no path from the request ever reaches the file system).
``no-cache`` with an ETag: a browser revalidates each load, so a new version shows at once, and an
unchanged file costs a 304. The content security policy allows this origin only, so the page can
load nothing from anywhere else even if a file were changed to try.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from balancer.http.route_table import Handlers

STATIC = Path(__file__).parent / "static"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
HEADERS = {
    "cache-control": "no-cache",
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _load() -> dict[str, tuple[bytes, str, str]]:
    files: dict[str, tuple[bytes, str, str]] = {}
    for path in sorted(STATIC.iterdir()):
        if path.suffix in TYPES:
            body = path.read_bytes()
            files[path.name] = (body, TYPES[path.suffix], '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
    return files


def console_routes() -> Handlers:
    """The console's routes; its files are read once, here."""
    files = _load()

    def serve(name: str, request: Request) -> Response:
        found = files.get(name)
        if found is None:  # the API's own 404 shape, like any unknown URL
            raise HTTPException(404)
        body, media_type, etag = found
        headers = {**HEADERS, "etag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    async def page(request: Request) -> Response:
        return serve("index.html", request)

    async def asset(request: Request) -> Response:
        return serve(request.path_params["name"], request)

    return {"console_page": page, "console_asset": asset}
