"""The console in a real Chromium: live counters, cards and rollout progress without reload,
actions refused without the token and delivered to a node's RPC with it."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from console import sim
from console.app import ConsoleConfig
from tests.conftest import ARTIFACTS, NatsServer, free_port

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "browser-token"
REV1 = "5d1c0a7e" + "1" * 32
REV2 = "9f3b2c4d" + "2" * 32


@contextlib.asynccontextmanager
async def chromium(base_url: str) -> AsyncIterator[tuple[BrowserContext, list[str]]]:
    """A Chromium context on the console; JavaScript errors of any of its pages are
    collected and must be none at the end."""
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = await browser.new_context(viewport={"width": 1360, "height": 900},
                                            base_url=base_url)
        errors: list[str] = []
        context.on("page", lambda pg: pg.on("pageerror", lambda exc: errors.append(str(exc))))
        yield context, errors
        await browser.close()
        assert errors == [], f"JavaScript errors: {errors}"


@pytest.fixture
async def page(nats_server: NatsServer) -> AsyncIterator[Page]:
    console = sim.ConsoleThread(ConsoleConfig(token=TOKEN), sim.connector_for(nats_server.url),
                                free_port()).start()
    try:
        async with chromium(console.url) as (context, _errors):
            yield await context.new_page()
    finally:
        console.stop()


async def populate(url: str) -> tuple[Any, Any, Any]:
    nc, js, kv = await sim.connect(url)
    now = datetime.now(UTC)
    fleet: list[tuple[str, str, str, dict[str, str], dict[str, Any]]] = [
        ("edge-01", "synced", REV2, {"role": "edge", "site": "ams"}, {}),
        ("edge-02", "progressing", REV1, {"role": "edge", "site": "fra"},
         {"desired_revision": REV2}),
        ("edge-03", "synced", REV2, {"role": "edge", "site": "fra"}, {}),
        ("edge-04", "progressing", REV1, {"role": "edge", "site": "ams"},
         {"desired_revision": REV2}),
        ("gateway-01", "failed", REV1, {"role": "gateway", "site": "ams"},
         {"desired_revision": REV2}),
        ("gateway-02", "synced", REV2, {"role": "gateway", "site": "fra"}, {}),
        ("db-01", "degraded", REV2, {"role": "db", "site": "ams"}, {}),
        ("db-02", "synced", REV1, {"role": "db", "site": "fra"}, {}),
    ]
    events = []
    for i, (node, state, rev, labels, extra) in enumerate(fleet):
        await sim.put_status(kv, sim.node_status(node, state, revision=rev, labels=labels,
                                                 **extra))
        events += sim.reconcile_events(node, REV1, now - timedelta(minutes=50, seconds=-4 * i),
                                       600 + 90 * i)
        if rev == REV2 or state == "failed":
            events += sim.reconcile_events(node, REV2, now - timedelta(minutes=3, seconds=-6 * i),
                                           900 + 120 * i, ok=state != "failed")
    await sim.publish_many(js, events)
    return nc, js, kv


async def test_console_is_live_and_actions_need_the_token(page: Page,
                                                          nats_server: NatsServer) -> None:
    nc, _js, kv = await populate(nats_server.url)
    node = await sim.FakeNode(nc, "edge-02", {"role": "edge"}).start()
    try:
        # -- overview: counters and cards, then live changes without a reload
        await page.goto("/")
        await expect(page.locator("#live")).to_have_text("live")
        await expect(page.locator("#count-nodes")).to_have_text("8")
        await expect(page.locator("#count-synced .n")).to_have_text("4")
        await expect(page.locator("#count-failed .n")).to_have_text("1")
        await page.evaluate("window.notReloaded = true")
        await page.screenshot(path=str(ARTIFACTS / "console-overview.png"), full_page=True)

        await sim.put_status(kv, sim.node_status("db-02", "failed", revision=REV1,
                                                 labels={"role": "db", "site": "fra"}))
        card = page.locator('.card[data-node="db-02"]')
        await expect(card).to_have_attribute("data-status", "failed")
        await expect(page.locator("#count-failed .n")).to_have_text("2")
        await page.select_option("#f-label", "role=edge")
        await expect(page.locator(".card:visible")).to_have_count(4)
        assert await page.evaluate("window.notReloaded") is True

        # -- rollout page follows nodes reaching the revision
        await page.goto(f"/rollouts/{REV2[:8]}")
        await expect(page.locator("#rollout-summary")).to_have_text(
            "3 of 7 nodes synced (43%)")
        await expect(page.locator("#failing")).to_contain_text("gateway-01")
        await page.evaluate("window.notReloaded = true")
        await sim.put_status(kv, sim.node_status("edge-04", revision=REV2,
                                                 labels={"role": "edge", "site": "ams"}))
        await expect(page.locator("#rollout-summary")).to_have_text(
            "4 of 7 nodes synced (57%)")
        assert await page.evaluate("window.notReloaded") is True
        await page.screenshot(path=str(ARTIFACTS / "console-rollout.png"), full_page=True)

        # -- actions: refused without the token, delivered to the node's RPC with it
        await page.goto("/nodes/edge-02")
        await expect(page.locator("#apps-table tbody tr")).to_have_count(3)
        await page.click('button[data-action="reconcile"]')
        await expect(page.locator("#flash")).to_contain_text("refused (401)")
        assert node.calls == []

        await page.click("#token-btn")
        await page.fill("#token-input", "not-the-token")
        await page.click('#token-form button[type="submit"]')
        await page.click('button[data-action="reconcile"]')
        await expect(page.locator("#flash")).to_contain_text("refused (403): wrong action token")
        assert node.calls == []

        await page.click("#token-btn")
        await page.fill("#token-input", TOKEN)
        await page.click('#token-form button[type="submit"]')
        await page.click('button[data-action="reconcile"]')
        await expect(page.locator("#flash")).to_contain_text("reconcile: run edge-02-run-1")
        assert node.calls == [("reconcile", {})]
        # the event the node published shows up live in the node's event list
        await expect(page.locator("#events-table tbody tr").first).to_contain_text(
            "reconcile.started")
        await page.screenshot(path=str(ARTIFACTS / "console-node.png"), full_page=True)

        # per-app actions carry the app; the node's errors (400) are shown as they are
        await page.click('tr[data-app="web"] button[data-app-action="suspend"]')
        await expect(page.locator("#flash")).to_contain_text('suspend web: {"suspend":true}')
        await page.click('tr[data-app="api"] button[data-app-action="health"]')
        await expect(page.locator("#flash")).to_contain_text(
            "refused (400): unknown app 'api'; this node has: web")
        assert node.calls[1:] == [("suspend", {"app": "web"}), ("health", {"app": "api"})]

        # -- event log: filter by type, newest first, links to node and app
        await page.goto("/events?type=reconcile.started")
        first = page.locator("#events-table tbody tr").first
        await expect(first).to_contain_text("edge-02")
        await expect(first).to_contain_text("requested from the console")
        # its trace id: short in the row, whole in the tooltip (no --trace-url: not a link)
        trace = first.locator("span.trace-id")
        trace_id = await trace.get_attribute("data-trace") or ""
        assert len(trace_id) == 32
        await expect(trace).to_have_text(trace_id[:8])
        await expect(trace).to_have_attribute("title", f"trace {trace_id}")
        await page.screenshot(path=str(ARTIFACTS / "console-events.png"), full_page=True)

        # app page: the app on every node; the plot has a bar per revision
        await page.goto("/apps/web")
        await expect(page.locator("#app-nodes tbody tr")).to_have_count(8)
        await page.goto("/?label=role%3Dedge")
        await expect(page.locator("#plot svg rect.bar")).to_have_count(2)
        # fleet reconcile of the shown nodes: the label filter becomes the selector
        await expect(page.locator(".card:visible")).to_have_count(4)
        await page.click("#fleet-reconcile")
        await expect(page.locator("#flash")).to_contain_text(
            "reconcile started on 1 node(s): edge-02")
        assert node.calls[-1] == ("fleet", {"selector": {"match": {"role": "edge"}}})
    finally:
        await node.stop()
        await nc.close()

