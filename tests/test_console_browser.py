"""The console in a real Chromium: live counters, cards and rollout progress without reload,
actions refused without the token and delivered to a node's RPC with it, and a real agent
following a real push while the pages are open."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sim
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from console.app import ConsoleConfig
from tests.conftest import (
    ARTIFACTS,
    NatsServer,
    SpecRepo,
    free_port,
    git,
    make_spec_repo,
)

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
        pytest.skip(reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
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
        # db-02 still runs REV1 of the same source: pending for REV2 (issue #12), targeted
        await expect(page.locator("#rollout-summary")).to_have_text(
            "3 of 8 nodes synced (38%)")
        await expect(page.locator("#failing")).to_contain_text("gateway-01")
        await page.evaluate("window.notReloaded = true")
        await sim.put_status(kv, sim.node_status("edge-04", revision=REV2,
                                                 labels={"role": "edge", "site": "ams"}))
        await expect(page.locator("#rollout-summary")).to_have_text(
            "4 of 8 nodes synced (50%)")
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


# ---- a real agent and a real push ---------------------------------------------------------

PUSH_NODE = "push-real-1"
JAEGER = "http://jaeger.example:16686/trace/{trace_id}"


def http_app_yaml(version: str, port: int) -> str:
    """A tiny real web app (python3's http.server) with an http health check."""
    return f"""\
name: web
version: "{version}"
layer: frontend
run:
  command: [{json.dumps(sys.executable)}, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
health:
  http:
    url: http://127.0.0.1:{port}/
  interval: 1s
  timeout: 1s
  start_timeout: 10s
"""


@contextlib.contextmanager
def real_agent(repo: SpecRepo, nats_url: str, state: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GITOPS_MESH_")}
    log_path = state / "agent.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "node", "--repo", repo.url, "--node-id",
             PUSH_NODE, "--label", "role=push", "--nats", nats_url, "--state-dir",
             str(state / "state"), "--interval", "1s", "--heartbeat", "1s",
             "--stop-apps-on-exit"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode not in (0, -signal.SIGTERM):
                print(log_path.read_text()[-3000:])


async def test_a_real_push_updates_the_open_node_card_and_rollout_page(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """Issue #5: push a spec change and watch the node card and the rollout page update
    without reloading, with a real agent deploying a real app."""
    port = free_port()
    repo = make_spec_repo(tmp_path / "specs", {"apps/web.yaml": http_app_yaml("1", port)})
    first = repo.head()
    console = sim.ConsoleThread(ConsoleConfig(token=TOKEN, trace_url=JAEGER),
                                sim.connector_for(nats_server.url), free_port()).start()
    try:
        with real_agent(repo, nats_server.url, tmp_path) as agent:
            async with chromium(console.url) as (context, _errors):
                overview = await context.new_page()
                await overview.goto("/")
                card = overview.locator(f'.card[data-node="{PUSH_NODE}"]')
                await expect(card).to_contain_text(first[:10], timeout=20_000)
                await expect(card).to_have_attribute("data-status", "synced", timeout=10_000)
                assert agent.poll() is None

                # the version bump is committed; its rollout page is open before the push
                repo.write("apps/web.yaml", http_app_yaml("2", port))
                git(repo.work, "add", "-A")
                git(repo.work, "commit", "-q", "-m", "web 2")
                second = repo.head()
                rollout = await context.new_page()
                await rollout.goto(f"/rollouts/{second}")
                await expect(rollout.locator("#progress")).to_contain_text(
                    "no node knows this revision yet")
                node = await context.new_page()
                await node.goto(f"/nodes/{PUSH_NODE}")
                await expect(node.locator("#live")).to_have_text("live")
                pages = (overview, rollout, node)
                for pg in pages:
                    await pg.evaluate("window.notReloaded = true")

                # push, and tell the fleet like a post-receive hook does
                git(repo.work, "push", "-q", "origin", "HEAD:main")
                subprocess.run(
                    [sys.executable, "-m", "reconciler", "notify", "--nats", nats_server.url,
                     "--repo", repo.url, "--branch", "main", "--revision", second],
                    check=True, capture_output=True, timeout=30)

                await expect(card).to_contain_text(second[:10], timeout=15_000)
                await expect(card).to_have_attribute("data-status", "synced", timeout=10_000)
                await expect(rollout.locator("#rollout-summary")).to_have_text(
                    "1 of 1 nodes synced (100%)", timeout=10_000)
                await expect(rollout.locator("#buckets")).to_contain_text(PUSH_NODE)
                # the node page got the upgrade event, its trace id linked to the tracer
                upgraded = node.locator("#events-table tbody tr", has_text="app.upgraded")
                await expect(upgraded).to_have_count(1, timeout=10_000)
                trace = upgraded.locator("a.trace-id")
                trace_id = await trace.get_attribute("data-trace") or ""
                assert len(trace_id) == 32
                await expect(trace).to_have_text(trace_id[:8])
                await expect(trace).to_have_attribute(
                    "href", JAEGER.replace("{trace_id}", trace_id))
                for pg in pages:
                    assert await pg.evaluate("window.notReloaded") is True
                await overview.screenshot(path=str(ARTIFACTS / "console-push-overview.png"),
                                          full_page=True)
                await rollout.screenshot(path=str(ARTIFACTS / "console-push-rollout.png"),
                                         full_page=True)
                await node.screenshot(path=str(ARTIFACTS / "console-push-node.png"),
                                      full_page=True)
                # the first revision's rollout now says how it went and what replaced it
                await overview.goto(f"/rollouts/{first}")
                await expect(overview.locator("#rollout-superseded")).to_contain_text(
                    f"Superseded by {second[:10]}. 1 node(s) have moved on")
                await expect(overview.locator("#rollout-summary")).to_have_text(
                    "1 of 1 nodes synced (100%)")
                await overview.screenshot(path=str(ARTIFACTS / "console-superseded.png"),
                                          full_page=True)
            # what the console showed is real: the agent runs and so does the upgraded app
            assert agent.poll() is None
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as res:
                assert res.status == 200
    finally:
        console.stop()
