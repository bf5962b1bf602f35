"""A key's limits on the console's Keys page, in a real headless Chromium (the fixtures of
``test_console``): a limited key shows them on a line under its name; a key without any shows none."""

from __future__ import annotations

from playwright.async_api import Browser, expect

from balancer.server import Balancer
from common.types import KeyLimits, Scope
from tests.e2e.test_console import (  # noqa: F401  (fixtures)
    WAIT_MS,
    balancer,
    browser,
)


async def test_the_keys_page_shows_each_keys_limits_under_its_name(
    balancer: Balancer,  # noqa: F811
    browser: Browser,  # noqa: F811
) -> None:
    admin = balancer.config.admin_key_file.read_text().strip()
    limits = KeyLimits(rpm=60, daily_tokens=5000, models=("gemma-3-270m",))
    limited, _ = await balancer.parts.keys.create("limited-app", [Scope.API], limits=limits)
    free, _ = await balancer.parts.keys.create("free-app", [Scope.API])

    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await page.goto(f"http://127.0.0.1:{balancer.http_port}/ui#keys")
    await page.get_by_label("API key").fill(admin)
    await page.get_by_role("button", name="Sign in").click()
    shown = page.locator(f"tr[data-key='{limited.id}'] [data-limits]")
    await expect(shown).to_have_text("rpm 60 · daily-tokens 5000 · models gemma-3-270m", timeout=WAIT_MS)
    await expect(page.locator(f"tr[data-key='{free.id}']")).to_contain_text("free-app")
    await expect(page.locator(f"tr[data-key='{free.id}'] [data-limits]")).to_have_count(0)
