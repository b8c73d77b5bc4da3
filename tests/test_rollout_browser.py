"""The rollout page in a real Chromium with real agents: the waves and the bake countdown
update live, and the token-guarded Pause / Resume / Promote buttons steer the rollout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sim
from conftest import ARTIFACTS, NatsServer, free_port
from playwright.async_api import expect
from test_console_browser import chromium
from test_rollout import api_yaml, fleet_of, rollout_yaml

from console.app import ConsoleConfig

pytestmark = pytest.mark.browser
TOKEN = "rollout-browser-token"


async def test_the_rollout_page_buttons_pause_resume_and_promote(
        tmp_path: Path, nats_server: NatsServer) -> None:
    nodes = {"canary-1": {"ring": "canary"}, "node-1": {}}
    async with fleet_of(tmp_path, nats_server, nodes) as fleet:
        console = sim.ConsoleThread(ConsoleConfig(token=TOKEN),
                                    sim.connector_for(nats_server.url), free_port()).start()
        try:
            async with chromium(console.url) as (context, _errors):
                sha = fleet.push({"rollout.yaml": rollout_yaml("1h"),
                                  "apps/api.yaml": api_yaml("2")}, "api 2, long bake")
                await fleet.synced(sha, ["canary-1"])
                page = await context.new_page()
                await page.goto(f"/rollouts/{sha}")
                await expect(page.locator("#coordination")).to_be_visible(timeout=15_000)
                await expect(page.locator("#rollout-state")).to_have_text("progressing")
                canary = page.locator('#waves tr[data-wave="canary"]')
                await expect(canary.locator(".wave-synced")).to_have_text("1/1", timeout=15_000)
                await expect(canary.locator(".bake")).to_have_text(re.compile(r"\d+s left"))
                await expect(page.locator('[data-rollout-action="resume"]')).to_be_hidden()

                await page.click("#token-btn")
                await page.fill("#token-input", TOKEN)
                await page.click('#token-form button[type="submit"]')
                await page.click('[data-rollout-action="pause"]')
                await expect(page.locator("#flash")).to_contain_text("pause: rollout paused")
                await expect(page.locator("#rollout-state")).to_have_text("paused")
                await expect(page.locator("#rollout-reason")).to_have_text(
                    "paused by an operator")
                await page.click('[data-rollout-action="resume"]')
                await expect(page.locator("#rollout-state")).to_have_text("progressing")
                await page.click('[data-rollout-action="promote"]')
                await expect(page.locator('#waves tr[data-wave="fleet"] .wave-synced')
                             ).to_have_text("1/1", timeout=30_000)
                await expect(page.locator("#rollout-state")).to_have_text("complete")
                await page.screenshot(path=str(ARTIFACTS / "rollout-page.png"), full_page=True)
                await fleet.synced(sha)
        finally:
            console.stop()
