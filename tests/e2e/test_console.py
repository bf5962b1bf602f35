"""The operator's console in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

One balancer in this process with both doors, its origin the fake hub; two nodes: a real ``xllm``
node that downloads from the hub and loads what it fetched, and an echo node that answers chat
(``devkit.echo_node``). One browser for the whole story an operator goes through: a wrong key
refused, sign in, two nodes, the Piper voice registered from the hub and pulled to the real node with
its progress bar to 100 %, a request in the charts, a key created and its usage after a request made
with it, revoked, the model deleted, signed out.
Each page is written to ``build/console-screenshots/`` (two of them are shown in docs/console.md).
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from balancer.server import Balancer, start
from common.config import load_balancer_config
from common.types import Scope
from devkit.echo_node import EchoNode
from devkit.fake_hub import FakeHub
from devkit.model_files import ModelFiles
from tests.integration.conftest import NodeProcess

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
REPO = "acme/voice"
MODEL = "voice"
CHAT_MODEL = "gemma-3-270m"  # what the echo node serves
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
async def node_key(balancer: Balancer) -> str:
    return (await balancer.parts.keys.create("nodes", [Scope.NODE]))[1]


@pytest.fixture
async def echo(balancer: Balancer, node_key: str) -> AsyncIterator[EchoNode]:
    node = EchoNode(f"127.0.0.1:{balancer.port}", api_key=node_key, node_id="echo", models=(CHAT_MODEL,))
    await node.start()
    yield node
    await node.stop()


@pytest.fixture
async def real_node(
    tmp_path: Path, balancer: Balancer, node_key: str, fake_hub: FakeHub
) -> AsyncIterator[NodeProcess]:
    env = {"HF_ENDPOINT": fake_hub.url, "XLLM_API_KEY": node_key, "XLLM_LOG_FORMAT": "json"}
    node = NodeProcess(tmp_path / "node", f"127.0.0.1:{balancer.port}", env, ["--node-id", "xllm-1"])
    # In a thread: the balancer and the echo node run on this event loop while the process starts.
    await asyncio.to_thread(node.start)
    yield node
    await asyncio.to_thread(node.stop)


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
    balancer: Balancer,
    echo: EchoNode,
    real_node: NodeProcess,
    piper: ModelFiles,
    browser: Browser,
    fake_hub: FakeHub,
) -> None:
    onnx, config = (piper.paths[f.filename] for f in piper.model.files)
    fake_hub.add_repo(REPO, {"voice.onnx": onnx.read_bytes(), "voice.onnx.json": config.read_bytes()})
    fake_hub.set_total_throttle(10_000_000)  # ~6 s for the voice's 63 MB, all connections: the bar moves
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
    await expect(page.locator("tr[data-node=echo]")).to_contain_text("online")
    await expect(page.locator("tr[data-node=xllm-1]")).to_contain_text("online")
    await shot(page, "nodes")

    # Drain the echo node, then put it back: it answers the chat further down.
    echo_row = page.locator("tr[data-node=echo]")
    await echo_row.get_by_role("button", name="Drain echo").click()
    await confirm(page)
    await expect(echo_row).to_contain_text("draining", timeout=WAIT_MS)
    await echo_row.get_by_role("button", name="Undrain echo").click()
    await expect(echo_row).to_contain_text("online", timeout=WAIT_MS)
    await expect(echo_row.get_by_role("button", name="Drain echo")).to_be_enabled()

    # Register from the hub, then pull to the real node and follow its download to 100 %.
    await page.get_by_role("link", name="Models").click()
    await page.get_by_label("Repository").fill(REPO)
    await page.get_by_label("File").fill("voice.onnx")
    await page.get_by_label("Model id").fill(MODEL)
    await page.get_by_role("button", name="Register").click()
    await expect(page.get_by_role("alert")).to_have_text(f"Registered {MODEL}.", timeout=WAIT_MS)
    row = page.locator(f"tr[data-model='{MODEL}']")
    await expect(row).to_contain_text("not ready")
    await row.get_by_role("button", name=f"Pull {MODEL}").click()
    await page.locator("#dialog").get_by_label("echo").uncheck()
    await confirm(page)
    await expect(page.get_by_role("alert")).to_be_hidden()  # accepted: no refusal shown
    bar = row.locator(f"[data-progress='{MODEL}@xllm-1']")
    await expect(bar).to_contain_text(re.compile(r"\b[1-9]\d? % · [\d.]+ MB of 63\.2 MB · "), timeout=WAIT_MS)
    await shot(page, "models")
    await expect(bar).to_contain_text("100 % · 63.2 MB of 63.2 MB", timeout=30_000)
    await expect(bar.locator("progress")).to_have_attribute("value", "100")
    await expect(row.locator("td").nth(1)).to_have_text("ready", timeout=30_000)

    await row.get_by_role("button", name=f"Manifest of {MODEL}").click()
    manifest = page.locator("#dialog")
    await expect(manifest).to_contain_text("voice.onnx.json")
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
            json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hello console"}]},
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
    await expect(page.locator("#usage")).to_contain_text(CHAT_MODEL, timeout=WAIT_MS)
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
