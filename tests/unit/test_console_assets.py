"""The console's files: served from the package under ``/ui``, revalidated by ETag, and self-contained."""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.testclient import TestClient

from balancer.console import console_routes
from balancer.console.routes import STATIC
from balancer.http.route_table import served


def client() -> TestClient:
    return TestClient(Starlette(routes=served([console_routes()], complete=False)))


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


def test_every_element_and_page_the_script_looks_up_is_on_the_page() -> None:
    script = (STATIC / "console.js").read_text()
    page = (STATIC / "index.html").read_text()
    ids = set(re.findall(r'\bid="([\w-]+)"', page))
    looked_up = set(re.findall(r'\$\("([\w-]+)"\)', script))
    assert looked_up and looked_up <= ids, looked_up - ids
    pages = re.search(r"const PAGES = \{([^}]*)\}", script)
    assert pages is not None
    for name in (entry.split(":")[0].strip() for entry in pages.group(1).split(",")):
        assert f"{name}-page" in ids and f'data-page="{name}"' in page, name


def test_data_is_never_parsed_as_html() -> None:
    script = (STATIC / "console.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(", script)
