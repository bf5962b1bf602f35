"""The operator's console in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

One balancer in this process with both doors, its origin the fake hub, and two echo nodes; one
browser for the whole story an operator goes through: a wrong key refused, sign in, two nodes, a
model registered from the hub and pulled with its progress bar to 100 %, a request in the charts, a
key created and its usage after a request made with it, revoked, the model deleted, signed out.
Each page is written to ``build/console-screenshots/`` (two of them are shown in the README).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from balancer.server import Balancer, start
from common.config import load_balancer_config
from common.types import ModelState, Scope
from devkit.echo_node import EchoNode
from devkit.fake_hub import FakeHub, gguf_blob

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "build" / "console-screenshots"
# Without these, Chromium on a machine with no network waits on connections that are refused.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = "acme/tiny-chat"
MODEL = "tiny-chat"
WAIT_MS = 15_000

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def balancer(tmp_path: Path, fake_hub: FakeHub) -> AsyncIterator[Balancer]:
    home = tmp_path / "balancer"
    config = load_balancer_config(
        home=home,
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        hf_endpoint=fake_hub.url,
        env={"LLMLB_HOME": str(home), "LLMLB_HEARTBEAT_INTERVAL_MS": "200", "LLMLB_USAGE_FLUSH": "1"},
    )
    started = await start(config)
    yield started
    await started.stop(grace=0)


@pytest.fixture
async def nodes(balancer: Balancer) -> AsyncIterator[list[EchoNode]]:
    _, node_key = await balancer.parts.keys.create("nodes", [Scope.NODE])
    started = [
        EchoNode(f"127.0.0.1:{balancer.port}", api_key=node_key, node_id=f"echo-{i}", models=())
        for i in (1, 2)
    ]
    for node in started:
        await node.start()
    yield started
    for node in started:
        await node.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def confirm(page: Page) -> None:
    await expect(page.locator("#dialog")).to_be_visible()
    await page.locator("#dialog-ok").click()


async def test_an_operator_runs_the_fleet_from_the_console(
    balancer: Balancer, nodes: list[EchoNode], browser: Browser, fake_hub: FakeHub
) -> None:
    fake_hub.add_repo(REPO, {"tiny-chat-Q4_K_M.gguf": gguf_blob(4_000_000)})
    admin = balancer.config.admin_key_file.read_text().strip()
    base = f"http://127.0.0.1:{balancer.http_port}"
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await page.goto(f"{base}/ui")

    # A wrong key is refused with the API's own message, and nothing is remembered.
    await page.get_by_label("API key").fill("llmlb-not-a-key")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_have_text("Sign-in refused: invalid or revoked API key")
    assert await page.evaluate("sessionStorage.length") == 0
    await shot(page, "sign-in")

    await page.get_by_label("API key").fill(admin)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("[data-tile=online] b")).to_have_text("2", timeout=WAIT_MS)
    assert admin not in page.url

    await page.get_by_role("link", name="Nodes").click()
    await expect(page.locator("#nodes tr")).to_have_count(2)
    await expect(page.locator("tr[data-node=echo-1]")).to_contain_text("online")
    await shot(page, "nodes")

    # Register from the hub, then pull to both nodes and follow one node's download to 100 %.
    await page.get_by_role("link", name="Models").click()
    await page.get_by_label("Repository").fill(REPO)
    await page.get_by_label("File").fill("tiny-chat-Q4_K_M.gguf")
    await page.get_by_label("Model id").fill(MODEL)
    await page.get_by_role("button", name="Register").click()
    await expect(page.get_by_role("alert")).to_have_text(f"Registered {MODEL}.", timeout=WAIT_MS)
    row = page.locator(f"tr[data-model='{MODEL}']")
    await expect(row).to_contain_text("not ready")
    downloading = nodes[0]
    downloading.state = ModelState.DOWNLOADING  # what the node reports while its download runs
    downloading.total_bytes, downloading.downloaded_bytes = 4_000_000, 1_200_000
    await row.get_by_role("button", name=f"Pull {MODEL}").click()
    await confirm(page)
    await expect(page.get_by_role("alert")).to_be_hidden()  # accepted: no refusal shown
    bar = row.locator(f"[data-progress='{MODEL}@echo-1']")
    await expect(bar).to_contain_text("30 % · 1.2 MB of 4.0 MB", timeout=WAIT_MS)
    await shot(page, "models")
    downloading.downloaded_bytes = 4_000_000
    downloading.state = ModelState.READY
    await expect(bar).to_contain_text("100 % · 4.0 MB of 4.0 MB", timeout=WAIT_MS)
    await expect(bar.locator("progress")).to_have_attribute("value", "100")
    await expect(row).to_contain_text("ready")

    await row.get_by_role("button", name=f"Manifest of {MODEL}").click()
    manifest = page.locator("#dialog")
    await expect(manifest).to_contain_text("tiny-chat-Q4_K_M.gguf")
    await expect(manifest).to_contain_text(f"{REPO} at {fake_hub.head(REPO)}")
    await page.keyboard.press("Escape")

    # A key for an application; its secret is shown once.
    await page.get_by_role("link", name="Keys").click()
    await page.get_by_label("Name").fill("app")
    await page.get_by_role("button", name="Create key").click()
    await expect(page.locator("#new-secret")).to_have_text(re.compile(r"^llmlb-\S{40,}$"), timeout=WAIT_MS)
    secret = await page.locator("#new-secret").inner_text()
    app_row = page.locator("#keys tr", has_text="app")
    await expect(app_row.locator("[data-requests]")).to_have_text("0", timeout=WAIT_MS)

    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        reply = await http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hello console"}]},
            headers={"authorization": f"Bearer {secret}"},
        )
        assert reply.status_code == 200, reply.text

    await expect(app_row.locator("[data-requests]")).to_have_text("1", timeout=WAIT_MS)
    await shot(page, "keys")

    await page.get_by_role("link", name="Overview").click()
    await expect(page.locator("#total-requests")).to_have_text("1", timeout=WAIT_MS)
    await expect(page.locator("figure[data-chart='Requests/s']")).to_be_visible()
    await shot(page, "overview")

    await page.get_by_role("link", name="Usage").click()
    await expect(page.locator("#usage")).to_contain_text(MODEL, timeout=WAIT_MS)
    await shot(page, "usage")

    # Revoke: the key stops working at once.
    await page.get_by_role("link", name="Keys").click()
    await app_row.get_by_role("button", name="Revoke app").click()
    await confirm(page)
    await expect(app_row).to_contain_text("revoked", timeout=WAIT_MS)
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        refused = await http.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
        assert refused.status_code == 401

    await page.get_by_role("link", name="Models").click()
    await row.get_by_role("button", name=f"Delete {MODEL}").click()
    await confirm(page)
    await expect(row).to_have_count(0, timeout=WAIT_MS)

    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_label("API key")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0


@pytest.fixture(scope="session", autouse=True)
def _fresh_screenshots() -> None:
    shutil.rmtree(SHOTS, ignore_errors=True)
