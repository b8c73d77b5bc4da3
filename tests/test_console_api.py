"""Console JSON API, live stream and actions against a real nats-server, with status and
events written the way agents write them, and a real micro-service responder per node."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import sim
from nats.aio.client import Client as NATS

from console.app import ConsoleConfig
from reconciler.core.events import make_event
from tests.conftest import NatsServer, eventually_async, free_port, start_nats

TOKEN = "s3cret-token"
REV1 = "1" * 40
REV2 = "2" * 40


@pytest.fixture(scope="module")
def console(nats_server: NatsServer) -> Iterator[sim.ConsoleThread]:
    config = ConsoleConfig(token=TOKEN, fleet_window=0.5, rpc_timeout=2.0)
    thread = sim.ConsoleThread(config, sim.connector_for(nats_server.url), free_port()).start()
    yield thread
    thread.stop()


async def get(http: httpx.AsyncClient, path: str, status: int = 200) -> Any:
    res = await http.get(path)
    assert res.status_code == status, res.text
    return res.json()


async def test_api_mirrors_kv_status_and_stream_events(nc: NATS, http: httpx.AsyncClient
                                                       ) -> None:
    js = nc.jetstream()
    kv = await js.key_value("gitops_nodes")
    now = datetime.now(UTC)
    await sim.put_status(kv, sim.node_status("api-a1", revision=REV2, labels={"role": "edge"}))
    await sim.put_status(kv, sim.node_status("api-a2", "failed", revision=REV1,
                                             desired_revision=REV2, labels={"role": "gw"}))
    await sim.put_status(kv, sim.node_status("api-a3", revision=REV1, labels={"role": "gw"},
                                             now=now - timedelta(minutes=5)))
    await kv.put("api-bad", b"{not a status")
    await sim.publish_many(js, [
        *sim.reconcile_events("api-a1", REV2, now, 1200),
        *sim.reconcile_events("api-a2", REV2, now, 800, ok=False),
        make_event("app.failed", "api-a2", now, app="web", version="1.0.0",
                   message="health check failed"),
    ])

    async def fleet_seen() -> Any:
        fleet = await get(http, "/api/fleet?label=role=gw")
        assert fleet["counters"]["nodes"] == 3 and fleet["feed"]["events_total"] >= 7, fleet
        return fleet

    fleet = await eventually_async(fleet_seen, what="console saw the KV and events")
    assert {k: fleet["counters"][k] for k in ("nodes", "synced", "failed", "unreachable")} == {
        "nodes": 3, "synced": 1, "failed": 1, "unreachable": 1}
    assert [c["node"] for c in fleet["nodes"]] == ["api-a2", "api-a3"]  # the label filter
    assert fleet["feed"]["rejected"] == 1  # the bad KV value, ignored

    cards = await get(http, "/api/nodes?status=unreachable")
    assert [(c["node"], c["reported_status"]) for c in cards] == [("api-a3", "synced")]

    node = await get(http, "/api/nodes/api-a2")
    assert (node["card"]["status"], node["status"]["desired_revision"]) == ("failed", REV2)
    assert [e["type"] for e in node["events"]] == [
        "app.failed", "reconcile.finished", "reconcile.started", "source.fetched"]

    rollout = await get(http, f"/api/rollouts/{REV2[:8]}")
    assert (rollout["revision"], rollout["targeted"], rollout["nodes"]["synced"],
            rollout["nodes"]["failed"]) == (REV2, 2, ["api-a1"], ["api-a2"])
    assert rollout["failing"][0]["error"].startswith("failed: web; web: health check failed")

    app = await get(http, "/api/apps/web")
    assert [(r["node"], r["phase"]) for r in app["nodes"]] == [
        ("api-a1", "running"), ("api-a2", "failed"), ("api-a3", "running")]

    events = await get(http, "/api/events?node=api-a2&type=app.")
    assert [(e["type"], e["app"], e["message"]) for e in events] == [
        ("app.failed", "web", "health check failed")]
    series = await get(http, "/api/series")
    assert [(s["revision"], s["reconciles"], s["failures"]) for s in series] == [(REV2, 2, 1)]

    assert await get(http, "/api/nodes/nope", 404) == {"error": "no node 'nope' in the fleet"}
    assert (await get(http, "/api/rollouts/zzzz", 404))["error"].startswith("revision 'zzzz'")
    assert await get(http, "/api/nodes?label=role", 400) == {
        "error": "label filter 'role': expected KEY=VALUE, e.g. role=gateway"}
    assert await get(http, "/api/events?limit=x", 400) == {"error": "?limit='x': expected a number"}

    spec = await get(http, "/api/openapi.json")
    assert spec["openapi"] == "3.1.0"
    assert {"/api/fleet", "/api/nodes/{node}", "/api/rollouts/{revision}", "/api/events",
            "/api/nodes/{node}/reconcile", "/api/fleet/reconcile"} <= set(spec["paths"])


async def read_sse(res: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in res.aiter_lines():
        if line.startswith("data: "):
            yield json.loads(line[6:])


async def test_stream_pushes_changes_coalesced(nc: NATS, http: httpx.AsyncClient) -> None:
    kv = await nc.jetstream().key_value("gitops_nodes")
    await sim.put_status(kv, sim.node_status("sse-n1", "progressing"))
    async with http.stream("GET", "/api/stream/node?name=sse-n1") as res:
        assert res.headers["content-type"].startswith("text/event-stream")
        messages = read_sse(res)
        first = await anext(messages)
        assert first["full"]["card"]["node"] == "sse-n1"
        # 40 quick status changes: the browser gets a few coalesced pushes, not 40
        for i in range(40):
            await sim.put_status(kv, sim.node_status(
                "sse-n1", "synced" if i == 39 else "progressing", message=f"step {i}"))
        pushes = 0
        async for msg in messages:
            pushes += 1
            if msg["full"]["status"]["message"] == "step 39":
                break
        assert msg["full"]["card"]["status"] == "synced"
        assert pushes < 20, f"{pushes} pushes for 40 changes: not coalesced"


async def test_overview_stream_sends_only_changed_cards(nc: NATS, http: httpx.AsyncClient
                                                        ) -> None:
    kv = await nc.jetstream().key_value("gitops_nodes")
    await sim.put_status(kv, sim.node_status("ov-n1"))
    await sim.put_status(kv, sim.node_status("ov-n2"))
    async with http.stream("GET", "/api/stream/overview") as res:
        messages = read_sse(res)
        first = await anext(messages)
        assert {"ov-n1", "ov-n2"} <= {c["node"] for c in first["full"]["nodes"]}
        await sim.put_status(kv, sim.node_status("ov-n2", "degraded"))
        async for msg in messages:
            delta = msg["delta"]
            if any(c["node"] == "ov-n2" for c in delta["upsert"]):
                break
        assert [(c["node"], c["status"]) for c in delta["upsert"]] == [("ov-n2", "degraded")]
        assert delta["counters"]["degraded"] >= 1


def headers(token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    out = {"Authorization": f"Bearer {token}"} if token else {}
    return {**out, **extra}


async def test_actions_reach_the_node_rpc_only_with_the_token(
        nc: NATS, http: httpx.AsyncClient) -> None:
    node = await sim.FakeNode(nc, "act-n1", {"role": "edge"}).start()
    other = await sim.FakeNode(nc, "act-n2", {"role": "gw"}).start()
    try:
        res = await http.post("/api/nodes/act-n1/reconcile")
        assert (res.status_code, res.json()) == (
            401, {"error": "action token required (Authorization: Bearer <token>)"})
        res = await http.post("/api/nodes/act-n1/reconcile", headers=headers("wrong"))
        assert (res.status_code, res.json()) == (403, {"error": "wrong action token"})
        assert node.calls == []

        res = await http.post("/api/nodes/act-n1/reconcile", headers=headers())
        assert (res.status_code, res.json()) == (200, {
            "node": "act-n1", "action": "reconcile", "run_id": "act-n1-run-1"})
        # the event the node published arrives in the console's event log
        async def event_seen() -> Any:
            return await get(http, "/api/events?node=act-n1&type=reconcile.started")
        assert (await eventually_async(event_seen))[0]["run_id"] == "act-n1-run-1"

        res = await http.post("/api/nodes/act-n1/suspend", json={"app": "web"},
                              headers=headers())
        assert res.json() == {"node": "act-n1", "action": "suspend", "suspend": True}
        res = await http.post("/api/nodes/act-n1/health", json={"app": "db"}, headers=headers())
        assert (res.status_code, res.json()["error"]) == (
            400, "unknown app 'db'; this node has: web")
        res = await http.post("/api/nodes/act-n1/resume", json={"app": "crash"},
                              headers=headers())
        assert (res.status_code, res.json()["error"]) == (502, "internal error: boom")
        res = await http.post("/api/nodes/nobody/reconcile", headers=headers())
        assert (res.status_code, res.json()["error"]) == (  # the CLI's words (one client)
            503, "node 'nobody' is not answering (no responders)")
        assert [c[0] for c in node.calls] == ["reconcile", "suspend", "health", "resume"]

        res = await http.post("/api/fleet/reconcile", headers=headers(),
                              json={"selector": {"match": {"role": "gw"}}})
        assert res.json() == {"replies": [{"node": "act-n2", "run_id": "act-n2-run-1"}],
                              "count": 1}
        # the nodes' short form: a plain label map
        res = await http.post("/api/fleet/reconcile", headers=headers(),
                              json={"selector": {"role": "gw"}})
        assert res.json() == {"replies": [{"node": "act-n2", "run_id": "act-n2-run-2"}],
                              "count": 1}
        res = await http.post("/api/fleet/reconcile", headers=headers(),
                              json={"selector": {"role": 1}})
        assert (res.status_code, res.json()) == (
            400, {"error": "invalid selector: label 'role' must be a string, got int"})
        res = await http.post("/api/fleet/reconcile", headers=headers())
        assert [r["node"] for r in res.json()["replies"]] == ["act-n1", "act-n2"]
    finally:
        await node.stop()
        await other.stop()


async def test_browser_requests_need_same_origin_and_the_csrf_token(
        http: httpx.AsyncClient, console: sim.ConsoleThread) -> None:
    page = await http.get("/")
    csrf = page.cookies["gm_csrf"]
    assert f'<meta name="csrf" content="{csrf}">' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    origin = console.url
    cases = [
        ({"Origin": "http://evil.example", "X-CSRF-Token": csrf},
         "cross-origin request refused (Origin: http://evil.example)"),
        ({"Sec-Fetch-Site": "cross-site", "X-CSRF-Token": csrf},
         "cross-site request refused (Sec-Fetch-Site: cross-site)"),
        ({"Origin": origin, "X-CSRF-Token": "forged"},
         "missing or wrong CSRF token: reload the page and try again"),
    ]
    for extra, error in cases:
        res = await http.post("/api/nodes/act-n1/reconcile", headers=headers(**extra))
        assert (res.status_code, res.json()) == (403, {"error": error})
    # a page on another host name (DNS rebinding) is not served at all on a loopback bind
    res = await http.get("/", headers={"Host": "evil.example"})
    assert res.status_code == 400


async def test_read_only_console_has_no_action_endpoints() -> None:
    from console.app import create_app

    app = create_app(ConsoleConfig(read_only=True), None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        assert (await client.post("/api/nodes/n1/reconcile")).status_code == 404
        assert (await client.post("/api/fleet/reconcile")).status_code == 404
        spec = (await client.get("/api/openapi.json")).json()
        assert "/api/fleet/reconcile" not in spec["paths"]
        page = await client.get("/")
        assert "read-only" in page.text and 'data-action="reconcile"' not in page.text


def test_cli_refuses_to_start_with_actions_and_no_token(tmp_path: Path) -> None:
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "reconciler", "console", "--nats", "nats://127.0.0.1:1"],
        capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 2
    assert "no token is set: pass --token or GITOPS_MESH_TOKEN" in out.stderr


async def test_feed_survives_nats_restarts_and_recreated_streams_exactly_once(
        tmp_path: Path) -> None:
    server = start_nats(tmp_path)
    thread = sim.ConsoleThread(ConsoleConfig(read_only=True, stream_check=0.3),
                               sim.connector_for(server.url), free_port()).start()
    try:
        async with httpx.AsyncClient(base_url=thread.url, timeout=10) as http:
            client = await nats.connect(server.url, max_reconnect_attempts=-1,
                                        reconnect_time_wait=0.2)
            js = client.jetstream()
            kv = await sim.ensure(js)
            now = datetime.now(UTC)
            await sim.publish_many(js, sim.reconcile_events("rs-n1", REV1, now))
            await sim.put_status(kv, sim.node_status("rs-n1", "progressing"))

            async def health(events: int, status: str) -> Any:
                h = await get(http, "/api/health")
                node = await get(http, "/api/nodes/rs-n1")
                assert (h["events_total"], node["card"]["status"]) == (events, status), h
                return h

            await eventually_async(lambda: health(3, "progressing"))
            server.stop()
            await eventually_async(lambda: health(3, "progressing"))
            server.start()  # same port, same store dir
            await eventually_async(lambda: get(http, "/api/health"))
            await sim.publish_many(js, sim.reconcile_events("rs-n1", REV2, now))
            await sim.put_status(kv, sim.node_status("rs-n1", revision=REV2))
            h = await eventually_async(lambda: health(6, "synced"), timeout=20)
            assert (h["state"], h["last_seq"]) == ("live", 6)

            # the stream deleted and made again (sequence numbers start over): followed too
            await js.delete_stream("GITOPS_EVENTS")
            await sim.ensure(js)
            await sim.publish_many(js, sim.reconcile_events("rs-n1", REV1, now))
            h = await eventually_async(lambda: health(9, "synced"), timeout=20)
            assert h["last_seq"] == 3

            # the status bucket made anew: the old statuses go, the new ones come
            await js.delete_key_value("gitops_nodes")
            kv = await sim.ensure(js)
            await sim.put_status(kv, sim.node_status("rs-n2"))

            async def only_n2() -> bool:
                nodes = await get(http, "/api/nodes")
                assert [n["node"] for n in nodes] == ["rs-n2"], nodes
                return True

            await eventually_async(only_n2, timeout=20)
            await client.close()
    finally:
        thread.stop()
        server.stop()


async def test_a_silent_node_turns_unreachable_on_the_open_stream(
        nc: NATS, http: httpx.AsyncClient) -> None:
    kv = await nc.jetstream().key_value("gitops_nodes")
    # heartbeat every 0.2 s: after 0.6 s of silence the node is unreachable, with no new
    # NATS traffic at all; the stream must notice by itself
    await sim.put_status(kv, sim.node_status("quiet-n1", heartbeat_interval_s=0.2))
    async with http.stream("GET", "/api/stream/overview?status=unreachable") as res:
        async for msg in read_sse(res):
            cards = msg["full"]["nodes"] if "full" in msg else msg["delta"]["upsert"]
            if any(c["node"] == "quiet-n1" and c["status"] == "unreachable" for c in cards):
                break
    cards = await get(http, "/api/nodes?status=unreachable")
    assert [c["reported_status"] for c in cards if c["node"] == "quiet-n1"] == ["synced"]


async def test_stream_requests_are_checked(http: httpx.AsyncClient) -> None:
    # streams of the tests before were closed by their clients: none is left running
    async def no_streams() -> bool:
        return (await get(http, "/api/health"))["streams"] == 0
    await eventually_async(no_streams, what="closed streams are released")
    assert await get(http, "/api/stream/node", 400) == {"error": "stream 'node' needs ?name="}
    assert (await get(http, "/api/stream/bogus", 404))["error"].startswith("no stream 'bogus'")
    assert await get(http, "/api/stream/overview?status=fine", 400) == {
        "error": "status filter 'fine': expected one of synced, progressing, degraded, "
                 "failed, suspended, unreachable"}


async def test_insecure_console_needs_no_token_but_still_the_csrf_check() -> None:
    from console.app import create_app

    app = create_app(ConsoleConfig(insecure=True), None)  # no NATS connection at all
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        res = await client.post("/api/nodes/n1/reconcile")
        assert (res.status_code, res.json()) == (
            403, {"error": "missing or wrong CSRF token: reload the page and try again"})
        page = await client.get("/")
        assert "actions without token" in page.text  # the header says so
        csrf = page.cookies["gm_csrf"]
        res = await client.post("/api/nodes/n1/reconcile", headers={"X-CSRF-Token": csrf})
        assert (res.status_code, res.json()) == (
            503, {"error": "the console is not connected to NATS"})
        res = await client.post("/api/nodes/n1/reboot", headers={"X-CSRF-Token": csrf})
        assert (res.status_code, res.json()["error"]) == (
            404, "no action 'reboot'; use reconcile, health, suspend, resume")
        res = await client.post("/api/fleet/reconcile", headers={"X-CSRF-Token": csrf},
                                json={"selector": {"match": "role"}})
        assert res.status_code == 400 and res.json()["error"].startswith("invalid selector")


async def test_node_page_stream_waits_for_a_node_that_has_not_reported_yet(
        nc: NATS, http: httpx.AsyncClient) -> None:
    kv = await nc.jetstream().key_value("gitops_nodes")
    async with http.stream("GET", "/api/stream/node?name=late-n1") as res:
        messages = read_sse(res)
        assert await anext(messages) == {"full": None}
        await sim.put_status(kv, sim.node_status("late-n1", labels={"role": "edge"}))
        # the next push is the node itself: no repeated "not found" pushes in between
        msg = await anext(messages)
        assert (msg["full"]["card"]["node"], msg["full"]["card"]["labels"]) == (
            "late-n1", {"role": "edge"})


def test_flags_and_env_make_the_console_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from console.cli import config_from_args
    from reconciler.cli.main import parse_args

    monkeypatch.setenv("GITOPS_MESH_TOKEN", "from-env")  # the environment, not project code
    args = parse_args(["console", "--nats", "nats://h:4222", "--events-keep", "7",
                       "--port", "9000"])
    config = config_from_args(args)
    assert (config.token, config.events_keep, config.host, config.read_only,
            config.insecure, args.port) == ("from-env", 7, "127.0.0.1", False, False, 9000)
    config.check()  # a token is set: actions may run
    monkeypatch.delenv("GITOPS_MESH_TOKEN")
    with pytest.raises(ValueError, match="no token is set"):
        config_from_args(parse_args(["console", "--nats", "nats://h:4222"])).check()
    config_from_args(parse_args(["console", "--nats", "x", "--read-only"])).check()


def test_trace_url_comes_from_the_flag_or_env_and_must_be_an_http_template(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from console.cli import config_from_args
    from reconciler.cli.main import parse_args

    jaeger = "http://jaeger:16686/trace/{trace_id}"
    args = parse_args(["console", "--nats", "x", "--read-only", "--trace-url", jaeger])
    assert config_from_args(args).trace_url == jaeger
    monkeypatch.setenv("GITOPS_MESH_TRACE_URL", "https://tempo/t/{trace_id}")
    config = config_from_args(parse_args(["console", "--nats", "x", "--read-only"]))
    assert config.trace_url == "https://tempo/t/{trace_id}"
    config.check()
    for bad, why in (("javascript:alert({trace_id})", "expected an http"),
                     ("http://jaeger:16686/search", "one {trace_id} placeholder")):
        with pytest.raises(ValueError, match=why):
            ConsoleConfig(read_only=True, trace_url=bad).check()


async def test_events_carry_their_trace_id_and_pages_the_trace_link_template(
        nc: NATS, http: httpx.AsyncClient) -> None:
    from console.app import create_app

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    await sim.publish_event(nc.jetstream(), make_event(
        "reconcile.finished", "trace-n1", datetime.now(UTC), revision=REV1,
        outcome="success", trace_id=trace))

    async def traced() -> Any:
        events = await get(http, "/api/events?node=trace-n1")
        assert [(e["type"], e.get("trace_id")) for e in events] == [
            ("reconcile.finished", trace)], events
        return events

    await eventually_async(traced, what="the event with its trace id")
    # without --trace-url the pages show the id unlinked; with it they get the template
    assert 'data-trace-url=""' in (await http.get("/events")).text
    jaeger = "http://jaeger:16686/trace/{trace_id}"
    app = create_app(ConsoleConfig(read_only=True, trace_url=jaeger), None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        for path in ("/events", "/nodes/trace-n1"):
            page = await client.get(path)
            assert f'data-trace-url="{jaeger}"' in page.text, path
        assert "<th>Trace</th>" in (await client.get("/events")).text


async def test_an_event_forged_for_another_node_is_not_believed(
        nc: NATS, http: httpx.AsyncClient) -> None:
    """Node permissions bind a node to gitops.events.<node>.>; the body could claim any
    node. Published through the real server on forge-n1's subject, claiming forge-n2."""
    js = nc.jetstream()
    now = datetime.now(UTC)
    before = (await get(http, "/api/health"))["forged"]
    forged = make_event("reconcile.finished", "forge-n2", now, revision=REV2,
                        outcome="success", message="forged")
    await js.publish("gitops.events.forge-n1.reconcile.finished", forged.to_json_bytes(),
                     headers={"Nats-Msg-Id": forged.id})
    # forge-n1's own event after it: once it shows, the forged one was read (and refused)
    await sim.publish_event(js, make_event("app.deployed", "forge-n1", now, app="web"))

    async def seen() -> Any:
        events = await get(http, "/api/events?node=forge-n1")
        assert [e["type"] for e in events] == ["app.deployed"], events
        return events

    await eventually_async(seen, what="forge-n1's real event")
    assert await get(http, "/api/events?node=forge-n2") == []
    assert "forged" not in {e.get("message") for e in await get(http, "/api/events")}
    assert (await get(http, "/api/health"))["forged"] == before + 1


async def test_names_from_the_url_are_escaped_in_pages() -> None:
    from console.app import create_app

    app = create_app(ConsoleConfig(read_only=True), None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        for path in ("/nodes/%22%3E%3Cscript%3Ealert(1)",
                     "/events?node=%3C%2Fscript%3E%3Cscript%3Ealert(1)%3C%2Fscript%3E"):
            page = await client.get(path)
            assert page.status_code == 200
            assert "<script>alert(1)" not in page.text, path
