"""Deployments in the operator's console, in a real headless Chromium (the fixtures of
``test_console``): the Piper voice deployed with one copy through the deploy dialog to a real
``xllm`` node, its desired and ready copies reaching 1 / 1, the placement and its outcome among the
events, the placement dialog, then undeployed: the copy unloads and is no longer pinned, its files
kept. An ``api`` key sees the deployment with no control to change it.
"""

from __future__ import annotations

import re

import httpx
from playwright.async_api import Browser, expect

from balancer.server import Balancer
from common.types import Scope
from devkit.fake_hub import FakeHub
from devkit.model_files import ModelFiles
from tests.e2e.test_console import (  # noqa: F401  (fixtures)
    WAIT_MS,
    balancer,
    browser,
    confirm,
    node_key,
    real_node,
    shot,
)
from tests.integration.conftest import NodeProcess

REPO = "acme/voice"
MODEL = "voice"
READY_MS = 45_000  # the voice's 63 MB from the hub, then its load


async def test_an_operator_deploys_a_model_and_reads_where_and_why_it_was_placed(
    balancer: Balancer,  # noqa: F811
    real_node: NodeProcess,  # noqa: F811
    piper: ModelFiles,
    browser: Browser,  # noqa: F811
    fake_hub: FakeHub,
) -> None:
    onnx, config = (piper.paths[f.filename] for f in piper.model.files)
    fake_hub.add_repo(REPO, {"voice.onnx": onnx.read_bytes(), "voice.onnx.json": config.read_bytes()})
    admin = balancer.config.admin_key_file.read_text().strip()
    _, app_key = await balancer.parts.keys.create("app", [Scope.API])
    base = f"http://127.0.0.1:{balancer.http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        registered = await http.post(
            "/v0/models",
            json={"repo_id": REPO, "filename": "voice.onnx", "model_id": MODEL},
            headers={"authorization": f"Bearer {admin}"},
        )
        assert registered.status_code == 201, registered.text

    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await page.goto(f"{base}/ui#models")
    await page.get_by_label("API key").fill(admin)
    await page.get_by_role("button", name="Sign in").click()
    row = page.locator(f"tr[data-model='{MODEL}']")
    cell = row.locator("[data-deployment]")
    await expect(cell).to_contain_text("not deployed", timeout=WAIT_MS)
    await expect(row.get_by_role("button", name=f"Undeploy {MODEL}")).to_have_count(0)

    # The dialog, by keyboard where a user would type: one fixed copy, no selector.
    await row.get_by_role("button", name=f"Deploy {MODEL}").click()
    dialog = page.locator("#dialog")
    await expect(dialog.get_by_label("Copies", exact=True)).to_be_focused()
    await page.keyboard.press("Control+A")
    await page.keyboard.type("1")
    await confirm(page)
    await expect(page.get_by_role("alert")).to_contain_text(f"Deployed {MODEL}: ", timeout=WAIT_MS)
    summary = row.locator("[data-summary]")
    await expect(summary).to_have_text("0 / 1 ready", timeout=WAIT_MS)
    copy = row.locator(f"[data-copy='{MODEL}@xllm-1']")
    await expect(copy).to_be_visible(timeout=WAIT_MS)  # placed: the node reports it pinned
    await expect(summary).to_have_text("1 / 1 ready", timeout=READY_MS)
    await expect(copy).to_contain_text("ready")
    on_node = row.locator(f"[data-progress='{MODEL}@xllm-1']")
    await expect(on_node.locator("[data-pinned]")).to_have_count(1)
    await shot(page, "deployments")

    await row.get_by_role("button", name=f"Placement of {MODEL}").click()
    await expect(dialog).to_contain_text(f"Placement of {MODEL}")
    await expect(dialog).to_contain_text("1 of 1 copies placed")
    await expect(dialog.locator("tr[data-verdict='xllm-1']")).to_be_visible()
    await expect(dialog).to_contain_text("placed on xllm-1: ")  # the decision, with its reason
    await shot(page, "placement")
    await page.keyboard.press("Escape")

    # The events: the placement with its estimate, then its copy ready, newest first.
    await page.get_by_role("link", name="Events").click()
    ready = page.locator("#events tr[data-event=ready]")
    placed = page.locator("#events tr[data-event=place]")
    await expect(ready).to_contain_text(f"{MODEL}xllm-1ready in ", timeout=WAIT_MS)
    await expect(ready.locator("td").nth(7)).to_have_text("ready")
    await expect(ready.locator("td").nth(6)).to_have_text(re.compile(r"^\d+\.\d s$"))
    await expect(placed).to_contain_text("placed on xllm-1: ")
    await expect(placed.locator("td").nth(5)).to_have_text(re.compile(r"^\d+\.\d s$"))
    assert await page.locator("#events tr").first.get_attribute("data-event") == "ready"
    await shot(page, "events")
    await page.locator("#events-page").get_by_label("Filter").fill("place")
    await expect(ready).to_have_count(0)
    await expect(placed).to_have_count(1)

    # An api key reads the deployment and its events, and has nothing to press.
    reader = await browser.new_page()
    await reader.goto(f"{base}/ui#models")
    await reader.get_by_label("API key").fill(app_key)
    await reader.get_by_role("button", name="Sign in").click()
    reader_row = reader.locator(f"tr[data-model='{MODEL}']")
    await expect(reader_row.locator("[data-summary]")).to_have_text("1 / 1 ready", timeout=WAIT_MS)
    await expect(reader_row.get_by_role("button", name=f"Placement of {MODEL}")).to_be_visible()
    for control in (f"Undeploy {MODEL}", f"Change deployment of {MODEL}", f"Deploy {MODEL}"):
        await expect(reader_row.get_by_role("button", name=control)).to_have_count(0)
    await reader.close()

    # Changed to one copy scaled on demand; what the dialog cannot send is said before any call.
    await page.get_by_role("link", name="Models").click()
    await row.get_by_role("button", name=f"Change deployment of {MODEL}").click()
    await dialog.get_by_label("Scaled on demand").check()
    await dialog.get_by_label("Node labels (one key=value a line)").fill("zone")
    await confirm(page)
    await expect(page.get_by_role("alert")).to_have_text('Deploy: selector line "zone" is not key=value')
    await row.get_by_role("button", name=f"Change deployment of {MODEL}").click()
    await dialog.get_by_label("Scaled on demand").check()
    await dialog.get_by_label("Min copies").fill("1")
    await dialog.get_by_label("Max copies").fill("1")
    await confirm(page)
    await expect(summary).to_have_text("min 1–max 1, 1 wanted, 1 ready", timeout=WAIT_MS)  # noqa: RUF001

    # Undeployed: the copy unloads and the node no longer keeps it pinned; its files stay.
    await row.get_by_role("button", name=f"Undeploy {MODEL}").click()
    await confirm(page)
    await expect(cell).to_contain_text("not deployed", timeout=WAIT_MS)
    await expect(on_node.locator("[data-pinned]")).to_have_count(0, timeout=WAIT_MS)
    await expect(on_node).to_contain_text("present", timeout=WAIT_MS)
    await page.get_by_role("link", name="Events").click()
    await page.locator("#events-page").get_by_label("Filter").fill("")
    await expect(page.locator("#events tr[data-event=remove]")).to_contain_text(
        "no deployment asks for it", timeout=WAIT_MS
    )
