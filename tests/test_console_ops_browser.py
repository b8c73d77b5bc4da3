"""The console pages and actions of issue #12 in a real Chromium (one browser for the module):
1,000 simulated nodes (search, grouping, unhealthy first, paging, live), fleet health check,
the clearer numbers, the node's dependency graph, Suspend/Resume, Forget node, the Apps page,
an app's spec, difference and log, roles, and the revision history linked from rollouts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import nats
import pytest
import pytest_asyncio
import sim
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue
from playwright.async_api import BrowserContext, Page, expect

from console.app import ConsoleConfig
from console.tokens import parse_tokens
from reconciler.core.status import AppStatus
from reconciler.mesh import subjects
from tests.conftest import ARTIFACTS, NatsServer, SpecRepo, free_port, make_spec_repo
from tests.test_console_browser import chromium

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

OPERATOR = "operator-token-1234"
VIEWER = "viewer-token-5678"
BIG = 1000


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> SpecRepo:
    return make_spec_repo(tmp_path_factory.mktemp("specs"), {
        "apps/web.yaml": 'name: web\nversion: "1"\nrun:\n  command: ["true"]\n'})


@pytest.fixture(scope="module")
def console(nats_server: NatsServer, repo: SpecRepo) -> Iterator[sim.ConsoleThread]:
    tokens = parse_tokens(json.dumps([{"name": "olga", "token": OPERATOR, "role": "operator"},
                                      {"name": "vera", "token": VIEWER, "role": "viewer"}]))
    config = ConsoleConfig(tokens=tokens, rpc_timeout=1.0, repo=repo.url, branch="main",
                           history_interval=600.0)
    thread = sim.ConsoleThread(config, sim.connector_for(nats_server.url), free_port()).start()
    yield thread
    thread.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def context(console: sim.ConsoleThread) -> AsyncIterator[BrowserContext]:
    async with chromium(console.url) as (ctx, _errors):
        yield ctx


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bus(nats_server: NatsServer) -> AsyncIterator[tuple[NATS, KeyValue]]:
    nc = await nats.connect(nats_server.url)
    kv = await sim.ensure(nc.jetstream())
    yield nc, kv
    await nc.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(context: BrowserContext) -> AsyncIterator[Page]:
    pg = await context.new_page()
    yield pg
    await pg.close()


def big_state(i: int) -> str:
    return "failed" if i % 97 == 5 else "degraded" if i % 131 == 7 else "synced"


async def use_token(page: Page, token: str) -> None:
    await page.click("#token-btn")
    await page.fill("#token-input", token)
    await page.click('#token-form button[type="submit"]')


async def test_a_fleet_of_1000_nodes_search_group_unhealthy_first_paging_live(
        page: Page, bus: tuple[NATS, KeyValue]) -> None:
    nc, kv = bus
    for i in range(BIG):
        await sim.put_status(kv, sim.node_status(
            f"node-{i:04d}", big_state(i), labels={"fleet": "big", "site": f"s{i % 7}"}))
    unhealthy = sum(big_state(i) != "synced" for i in range(BIG))
    await page.goto("/?label=fleet%3Dbig")
    await expect(page.locator("#live")).to_have_text("live")
    await expect(page.locator("#page-info")).to_have_text(
        f"1–100 of {BIG} · page 1 of 10", timeout=15_000)  # noqa: RUF001 (as shown)
    await expect(page.locator(".card")).to_have_count(100)  # only one page is in the DOM
    # unhealthy first: failed, then degraded, then the synced ones
    statuses = await page.locator(".card").evaluate_all("els => els.map(e => e.dataset.status)")
    assert statuses[:unhealthy] == sorted(statuses[:unhealthy], key=["failed", "degraded"].index)
    assert set(statuses[unhealthy:]) == {"synced"}
    await page.evaluate("window.notReloaded = true")

    # paging
    await page.click("#page-next")
    await expect(page.locator("#page-info")).to_have_text(
        f"101–200 of {BIG} · page 2 of 10")  # noqa: RUF001 (as shown)
    second_page = await page.locator(".card").evaluate_all("els => els.map(e => e.dataset.node)")
    assert len(second_page) == 100
    await page.click("#page-prev")

    # search by node id
    await page.fill("#f-search", "node-0421")
    await expect(page.locator(".card")).to_have_count(1)
    await expect(page.locator(".card")).to_have_attribute("data-node", "node-0421")
    await page.fill("#f-search", "")

    # group by site: every group named with its size, heads in the list
    await page.select_option("#f-group", "site")
    await expect(page.locator("#groups .group-chip")).to_have_count(7)
    await expect(page.locator('#groups [data-group="s3"]')).to_contain_text(
        f"site=s3: {len(range(3, BIG, 7))}")
    await expect(page.locator(".group-head").first).to_contain_text("site=s0")
    await page.screenshot(path=str(ARTIFACTS / "console-1000-grouped.png"))
    await page.select_option("#f-group", "")

    # live: a node that fails now comes to the first page without a reload
    await sim.put_status(kv, sim.node_status("node-0999", "failed",
                                             labels={"fleet": "big", "site": "s5"}))
    await expect(page.locator('.card[data-node="node-0999"]')).to_have_attribute(
        "data-status", "failed")
    assert await page.evaluate("window.notReloaded") is True

    # check health of the shown nodes: the ten that match the search
    responder = await sim.HealthResponder(nc, {f"node-000{i}" for i in range(10)},
                                          frozenset({"node-0005"})).start()
    try:
        await use_token(page, OPERATOR)
        await page.fill("#f-search", "node-000")
        await expect(page.locator(".card")).to_have_count(10)
        await page.click("#fleet-health")
        await expect(page.locator("#health-summary")).to_have_text("9 of 10 node(s) healthy")
        await expect(page.locator('#health-results li[data-node="node-0005"]')).to_contain_text(
            "unhealthy: web")
        assert sorted(responder.asked) == [f"node-000{i}" for i in range(10)]
    finally:
        await responder.stop()


async def test_the_numbers_say_what_they_count(page: Page, bus: tuple[NATS, KeyValue]) -> None:
    """A rolled-back app that runs is "rolled back", not "failed"; a long message is shown
    whole on hover and on "more"; rollout rows count degraded apart; the plot has a time
    axis and an open dot for a revision that has not converged."""
    nc, kv = bus
    now = datetime.now(UTC)
    message = "failed: web: upgrade to 2.0 rolled back: " + "health check timed out " * 8
    status = sim.node_status("num-1", "failed", labels={"fleet": "num"}, message=message)
    status.apps[0] = AppStatus(name="web", version="1.0", phase="running", health="healthy",
                               failed_version="2.0")
    await sim.put_status(kv, status)
    await sim.put_status(kv, sim.node_status("num-2", "degraded", labels={"fleet": "num"},
                                             revision="e" * 40))
    await sim.put_status(kv, sim.node_status("num-3", labels={"fleet": "num"}, revision="e" * 40))
    js = nc.jetstream()
    await sim.publish_many(js, sim.reconcile_events("num-3", "e" * 40, now - timedelta(minutes=2))
                           + sim.reconcile_events("num-2", "e" * 40, now - timedelta(minutes=1),
                                                  ok=False))
    await page.goto("/?label=fleet%3Dnum")
    card = page.locator('.card[data-node="num-1"]')
    await expect(card).to_contain_text("3/3 apps running · 1 rolled back")
    await expect(card).not_to_contain_text("failed ·")
    assert int(await page.locator("#count-apps-rolled-back .n").inner_text()) >= 1
    msg = card.locator(".msg")
    await expect(msg).to_have_attribute("title", message)
    one_line = (await msg.bounding_box() or {"height": 0})["height"]
    await card.locator(".msg-toggle").click()
    await expect(msg).to_have_class("msg open")
    assert (await msg.bounding_box() or {"height": 0})["height"] > 2 * one_line
    assert "/nodes/" not in page.url  # the click expanded the message, it did not navigate
    row = page.locator(f'.rollout[data-revision="{"e" * 40}"]')
    await expect(row.locator(".rollout-text")).to_have_text("1/2 synced, 1 degraded")
    await expect(row.locator('.progress [data-bucket="degraded"]')).to_have_count(1)
    await expect(row.locator('.progress [data-bucket="failed"]')).to_have_count(0)
    await expect(page.locator("#plot text.tick")).to_have_count(5)
    await expect(page.locator("#plot circle.open-dot")).not_to_have_count(0)
    await page.screenshot(path=str(ARTIFACTS / "console-numbers.png"), full_page=True)


async def test_node_page_graph_suspend_state_and_forget(page: Page,
                                                        bus: tuple[NATS, KeyValue]) -> None:
    _nc, kv = bus
    status = sim.node_status("dep-1", "suspended", labels={"fleet": "dep"})
    status.apps = [
        AppStatus(name="db", version="1", phase="running", health="healthy"),
        AppStatus(name="api", version="1", phase="failed", health="unhealthy",
                  depends_on=["db"]),
        AppStatus(name="web", version="1", phase="running", health="healthy",
                  depends_on=["api"], suspended=True),
    ]
    await sim.put_status(kv, status)
    page.on("dialog", lambda dialog: dialog.accept())
    await page.goto("/nodes/dep-1")
    await expect(page.locator("#dep-graph g[data-app]")).to_have_count(3)
    await expect(page.locator('#dep-graph g[data-app="api"]')).to_have_attribute(
        "data-phase", "failed")
    await expect(page.locator("#dep-graph path[data-edge]")).to_have_count(2)
    xs = [float(await page.locator(f'#dep-graph g[data-app="{a}"] rect').first.get_attribute("x")
                or 0) for a in ("db", "api", "web")]
    assert xs == sorted(xs) and len(set(xs)) == 3  # one column per generation
    # suspended: "Suspend" shows the state and is pressed; "Resume" is the action left
    suspend, resume = page.locator('button[data-action="suspend"]'), page.locator(
        'button[data-action="resume"]')
    await expect(suspend).to_have_text("Suspended")
    await expect(suspend).to_be_disabled()
    await expect(suspend).to_have_attribute("aria-pressed", "true")
    await expect(resume).to_be_enabled()
    await expect(page.locator('tr[data-app="web"] button[data-app-action="resume"]')).to_have_class(
        "small-btn primary-now")
    await page.screenshot(path=str(ARTIFACTS / "console-node-graph.png"), full_page=True)
    await sim.put_status(kv, sim.node_status("dep-1", labels={"fleet": "dep"}))
    await expect(suspend).to_have_text("Suspend")
    await expect(resume).to_be_disabled()

    # forget: a viewer is refused; an operator deletes it; it comes back with a heartbeat
    await use_token(page, VIEWER)
    await page.click("#forget-node")
    await expect(page.locator("#flash")).to_contain_text("refused (403)")
    await use_token(page, OPERATOR)
    await page.click("#forget-node")
    await expect(page.locator("#flash")).to_contain_text("dep-1 forgotten")
    await expect(page.locator("#node-facts")).to_contain_text("has not reported")
    await sim.put_status(kv, sim.node_status("dep-1", labels={"fleet": "dep"}))
    await expect(page.locator("#node-status")).to_have_text("synced")


async def test_apps_page_app_spec_diff_and_log(page: Page, bus: tuple[NATS, KeyValue]) -> None:
    nc, kv = bus
    await sim.put_status(kv, sim.node_status("spec-1", labels={"fleet": "spec"}))
    node = await sim.FakeNode(nc, "spec-1").start()
    try:
        await page.goto("/apps?label=fleet%3Dspec")
        await expect(page.locator("#apps-table tbody tr")).to_have_count(3)
        await expect(page.locator('tr[data-app="web"] .versions')).to_contain_text(
            "1.0.0 × 1")  # noqa: RUF001 (as shown)
        await page.fill('#app-filters input[name="name"]', "wor")
        await page.click('#app-filters button[type="submit"]')
        await expect(page.locator("#apps-table tbody tr")).to_have_count(1)
        await expect(page.locator("#apps-table tbody tr")).to_have_attribute("data-app", "worker")

        await page.goto("/apps/web?node=spec-1")
        await expect(page.locator("#app-node")).to_have_value("spec-1")
        await expect(page.locator("#app-spec")).to_contain_text(
            '"description": "the web front end"')
        await expect(page.locator('#app-diff tr[data-path="version"]')).to_contain_text("2.0")
        await expect(page.locator('#app-diff tr[data-path="run.env.TOKEN"]')).to_contain_text("***")
        # the log needs a token (viewer at least)
        await expect(page.locator("#log-info")).to_contain_text("(401)")
        await use_token(page, VIEWER)
        await page.click("#log-load")
        await expect(page.locator("#app-log")).to_contain_text("web line 300")
        await expect(page.locator("#log-info")).to_contain_text("200 line(s) from spec-1")
        await page.check("#log-follow")
        node.log_lines.append("web line 301: followed")
        await expect(page.locator("#app-log")).to_contain_text("web line 301: followed")
        await page.locator("#app-spec").scroll_into_view_if_needed()
        await page.screenshot(path=str(ARTIFACTS / "console-app-spec-log.png"))
    finally:
        await node.stop()


async def test_history_is_linked_from_rollout_rows_and_rollout_pages(
        page: Page, bus: tuple[NATS, KeyValue], repo: SpecRepo) -> None:
    nc, kv = bus
    repo.write("apps/api.yaml", 'name: api\nversion: "1"\nrun:\n  command: ["true"]\n')
    head = repo.commit_and_push("add the api")
    await nc.publish(subjects.SOURCE_CHANGED, b"{}")
    await sim.put_status(kv, sim.node_status("hist-1", revision=head, labels={"fleet": "hist"}))
    await page.goto("/?label=fleet%3Dhist")
    commit = page.locator(f'.rollout[data-revision="{head}"] .commit a')
    await expect(commit).to_have_text("add the api", timeout=15_000)
    await commit.click()
    selected = page.locator("#history-table tr.selected")
    await expect(selected).to_have_attribute("data-revision", head)
    await expect(selected.locator(".apps")).to_have_text("api")
    await expect(page.locator("#history-table tbody tr")).to_have_count(2)
    await page.screenshot(path=str(ARTIFACTS / "console-history.png"), full_page=True)
    await page.goto(f"/rollouts/{head[:10]}")
    await page.click("#rollout-commit")
    await expect(page.locator("#history-table tr.selected")).to_have_attribute(
        "data-revision", head)


async def test_a_viewer_token_is_refused_actions_in_the_browser(
        page: Page, bus: tuple[NATS, KeyValue]) -> None:
    nc, kv = bus
    await sim.put_status(kv, sim.node_status("role-1"))
    node = await sim.FakeNode(nc, "role-1").start()
    try:
        await page.goto("/nodes/role-1")
        await use_token(page, VIEWER)
        await page.click('button[data-action="reconcile"]')
        await expect(page.locator("#flash")).to_contain_text(
            "refused (403): token 'vera' is a viewer")
        assert node.calls == []
        await use_token(page, OPERATOR)
        await page.click('button[data-action="reconcile"]')
        await expect(page.locator("#flash")).to_contain_text("reconcile: run role-1-run-1")
        # the audit event names the token, in the console's own event log
        await page.goto("/events?node=console")
        await expect(page.locator("#events-table tbody tr").first).to_contain_text(
            "olga (operator): reconcile node=role-1 -> 200")
    finally:
        await node.stop()
