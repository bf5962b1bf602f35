"""The console's files: served from the package under ``/ui``, revalidated by ETag, and self-contained."""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.testclient import TestClient

from balancer.console import console_routes
from balancer.console.routes import STATIC


def client() -> TestClient:
    return TestClient(Starlette(routes=console_routes()))


def test_the_page_and_its_assets_are_served_with_a_policy_that_allows_this_origin_only() -> None:
    with client() as http:
        page = http.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["referrer-policy"] == "no-referrer"
        for asset in re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text):
            assert http.get(asset).status_code == 200, asset
        assert http.get("/ui/console.js").headers["content-type"].startswith("text/javascript")


def test_an_unchanged_file_is_a_304_and_an_unknown_one_a_404() -> None:
    with client() as http:
        etag = http.get("/ui/console.css").headers["etag"]
        assert http.get("/ui/console.css", headers={"if-none-match": etag}).status_code == 304
        assert http.get("/ui/secrets.txt").status_code == 404
        assert http.get("/ui/..%2Fconsole%2Froutes.py").status_code == 404


def test_nothing_is_fetched_from_another_origin() -> None:
    for path in STATIC.iterdir():
        text = path.read_text()
        # Only the SVG namespace URI (a name, never fetched) may look like a remote address.
        remote = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not remote, (path.name, remote)
        assert "@import" not in text and "url(" not in text, path.name
