"""Console operations of issue #12 over HTTP against a real nats-server: roles and the audit
trail, forget node, fleet health check, an app's spec/diff and log from a node, the Apps
view, the revision history of a real git repo, and the OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import sim
from nats.aio.client import Client as NATS

from console.app import ConsoleConfig
from console.cli import config_from_args
from console.tokens import parse_tokens
from reconciler.cli.main import build_parser
from reconciler.mesh import subjects
from tests.conftest import NatsServer, SpecRepo, eventually_async, free_port, make_spec_repo

OPERATOR = "operator-token-1234"
VIEWER = "viewer-token-5678"
SINGLE = "single-token-0000"
TOKENS = [{"name": "olga", "token": OPERATOR, "role": "operator"},
          {"name": "vera", "token": VIEWER, "role": "viewer"}]


def app_yaml(name: str, version: str) -> str:
    return f"name: {name}\nversion: \"{version}\"\nrun:\n  command: [\"true\"]\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> SpecRepo:
    return make_spec_repo(tmp_path_factory.mktemp("specs"), {"apps/web.yaml": app_yaml("web", "1")})


@pytest.fixture(scope="module")
def console(nats_server: NatsServer, repo: SpecRepo) -> Iterator[sim.ConsoleThread]:
    config = ConsoleConfig(token=SINGLE, tokens=parse_tokens(json.dumps(TOKENS)),
                           rpc_timeout=0.5, repo=repo.url, branch="main",
                           history_interval=600.0, log_lines_max=300)
    thread = sim.ConsoleThread(config, sim.connector_for(nats_server.url), free_port()).start()
    yield thread
    thread.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def audit_events(nc: NATS) -> list[dict[str, Any]]:
    js = nc.jetstream()
    sub = await js.subscribe(subjects.event_subject("console", ">"), ordered_consumer=True,
                             deliver_policy=nats.js.api.DeliverPolicy.ALL)
    out = []
    try:
        while True:
            msg = await sub.next_msg(timeout=0.3)
            out.append(json.loads(msg.data))
    except nats.errors.TimeoutError:
        return out
    finally:
        await sub.unsubscribe()


async def wait_node(http: httpx.AsyncClient, node: str, present: bool = True) -> None:
    async def check() -> bool:
        return ((await http.get(f"/api/nodes/{node}")).status_code == 200) == present
    await eventually_async(check, what=f"node {node} {'shown' if present else 'gone'}")


async def test_viewer_is_refused_actions_operator_acts_and_the_audit_names_the_token(
        nc: NATS, http: httpx.AsyncClient) -> None:
    kv = await nc.jetstream().key_value(subjects.KV_BUCKET)
    await sim.put_status(kv, sim.node_status("role-1"))
    node = await sim.FakeNode(nc, "role-1").start()
    try:
        await wait_node(http, "role-1")
        refused = await http.post("/api/nodes/role-1/reconcile", headers=bearer(VIEWER))
        assert refused.status_code == 403
        assert "'vera' is a viewer" in refused.json()["error"]
        assert (await http.post("/api/nodes/role-1/reconcile")).status_code == 401
        assert (await http.post("/api/nodes/role-1/reconcile",
                                headers=bearer("nobody-knows-it"))).status_code == 403
        assert node.calls == []

        done = await http.post("/api/nodes/role-1/reconcile", headers=bearer(OPERATOR))
        assert done.status_code == 200 and done.json()["run_id"] == "role-1-run-1"
        # the old single --token still acts, as an operator named "token"
        res = await http.post("/api/nodes/role-1/suspend", headers=bearer(SINGLE),
                              json={"app": "web"})
        assert res.status_code == 200
        assert [c[0] for c in node.calls] == ["reconcile", "suspend"]

        async def audited() -> list[dict[str, Any]]:
            found = [e for e in await audit_events(nc) if e["data"].get("node") == "role-1"]
            return found if len(found) >= 2 else []
        events = await eventually_async(audited, what="two audit events")
        assert [(e["type"], e["data"]["actor"], e["data"]["role"], e["data"]["status"])
                for e in events] == [("action.reconcile", "olga", "operator", 200),
                                     ("action.suspend", "token", "operator", 200)]
        assert events[1]["app"] == "web" and "olga" not in events[1]["message"]
        # the console's own event log shows them, as the console's events
        log = (await http.get("/api/events?node=console&type=action.")).json()
        assert {e["data"]["actor"] for e in log} >= {"olga", "token"}
    finally:
        await node.stop()


async def test_forget_deletes_the_status_and_a_node_that_comes_back_reappears(
        nc: NATS, http: httpx.AsyncClient) -> None:
    kv = await nc.jetstream().key_value(subjects.KV_BUCKET)
    await sim.put_status(kv, sim.node_status("old-1"))
    await wait_node(http, "old-1")
    assert (await http.post("/api/nodes/old-1/forget", headers=bearer(VIEWER))).status_code == 403
    assert (await http.post("/api/nodes/nope-9/forget",
                            headers=bearer(OPERATOR))).status_code == 404
    res = await http.post("/api/nodes/old-1/forget", headers=bearer(OPERATOR))
    assert res.json() == {"node": "old-1", "action": "forget", "forgotten": True}
    await wait_node(http, "old-1", present=False)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("old-1")
    await sim.put_status(kv, sim.node_status("old-1"))  # its next heartbeat
    await wait_node(http, "old-1")
    assert any(e["type"] == "action.forget" and e["data"] == {
        "actor": "olga", "role": "operator", "action": "forget", "status": 200, "node": "old-1"}
        for e in await audit_events(nc))


async def test_fleet_health_asks_every_given_node(nc: NATS, http: httpx.AsyncClient) -> None:
    responder = await sim.HealthResponder(nc, {"h-1", "h-2"}, frozenset({"h-2"})).start()
    try:
        res = await http.post("/api/fleet/health", headers=bearer(OPERATOR),
                              json={"nodes": ["h-1", "h-2", "h-3"]})
        assert res.status_code == 200
        body = res.json()
        assert (body["count"], body["healthy"], body["unhealthy"]) == (3, 1, 2)
        by_node = {r["node"]: r for r in body["results"]}
        assert by_node["h-1"] == {"node": "h-1", "ok": True, "apps": {"web": "healthy"},
                                  "unhealthy": []}
        assert by_node["h-2"]["unhealthy"] == ["web"]
        assert by_node["h-3"]["ok"] is False and by_node["h-3"]["code"] in (503, 504)
        assert sorted(responder.asked) == ["h-1", "h-2"]
        bad = await http.post("/api/fleet/health", headers=bearer(OPERATOR),
                              json={"nodes": ["a b"]})
        assert bad.status_code == 400
    finally:
        await responder.stop()


async def test_app_spec_diff_and_log_tail_from_a_node(nc: NATS, http: httpx.AsyncClient) -> None:
    kv = await nc.jetstream().key_value(subjects.KV_BUCKET)
    await sim.put_status(kv, sim.node_status("spec-1"))
    node = await sim.FakeNode(nc, "spec-1").start()
    try:
        spec = (await http.get("/api/apps/web/spec?node=spec-1")).json()
        assert spec["running"]["version"] == "1.0"
        assert {d["path"]: (d["desired"], d["running"]) for d in spec["diff"]} == {
            "version": ("2.0", "1.0"), "run.env.TOKEN": ("***", None)}
        assert spec["state"]["phase"] == "running" and "spec" not in spec["state"]
        assert (await http.get("/api/apps/other/spec?node=spec-1")).status_code == 404
        assert (await http.get("/api/apps/web/spec?node=")).status_code == 400

        # app output may hold anything: a token at least of a viewer
        assert (await http.get("/api/apps/web/logs?node=spec-1")).status_code == 401
        tail = await http.get("/api/apps/web/logs?node=spec-1&lines=5", headers=bearer(VIEWER))
        assert tail.json()["lines"] == [f"web line {i}" for i in range(296, 301)]
        node.log_lines.append("web line 301")
        more = await http.get(f"/api/apps/web/logs?node=spec-1&cursor={tail.json()['cursor']}",
                              headers=bearer(VIEWER))
        assert more.json()["lines"] == ["web line 301"]
        too_many = await http.get("/api/apps/web/logs?node=spec-1&lines=301",
                                  headers=bearer(VIEWER))
        assert too_many.status_code == 400
        assert ("logs", {"app": "web", "lines": 5}) in node.calls
    finally:
        await node.stop()


async def test_apps_view_and_dependency_graph(nc: NATS, http: httpx.AsyncClient) -> None:
    kv = await nc.jetstream().key_value(subjects.KV_BUCKET)
    await sim.put_status(kv, sim.node_status("apps-1", labels={"site": "zz"}, apps=2))
    await wait_node(http, "apps-1")
    rows = (await http.get("/api/apps?label=site=zz")).json()
    assert [r["app"] for r in rows] == ["api", "web"]
    assert rows[1]["version_counts"] == {"1.0.0": 1}
    assert [r["app"] for r in (await http.get("/api/apps?name=we&label=site=zz")).json()] == [
        "web"]
    assert (await http.get("/api/apps?label=nope")).status_code == 400
    graph = (await http.get("/api/nodes/apps-1/graph")).json()
    assert {b["app"] for b in graph["boxes"]} == {"api", "web"}


async def test_history_reads_the_repo_and_refreshes_on_source_changed(
        nc: NATS, http: httpx.AsyncClient, repo: SpecRepo) -> None:
    async def commits() -> list[dict[str, Any]]:
        return (await http.get("/api/history")).json()["commits"]
    first = await eventually_async(commits, what="the initial commit")
    assert (first[-1]["subject"], first[-1]["apps"]) == ("initial specs", ["web"])

    repo.write("apps/api.yaml", app_yaml("api", "1"))
    repo.commit_and_push("add the api")
    # history_interval is 10 minutes: only the push hook's notice can make it show now
    await nc.publish(subjects.SOURCE_CHANGED, json.dumps({"repo": repo.url}).encode())

    async def refreshed() -> bool:
        return (await commits())[0]["subject"] == "add the api"
    await eventually_async(refreshed, what="the pushed commit")
    head = repo.head()
    view = (await http.get(f"/api/history?revision={head[:8]}")).json()
    assert (view["selected"], view["commits"][0]["apps"], view["branch"]) == (head, ["api"],
                                                                             "main")
    # a rollout row of that revision carries its commit
    kv = await nc.jetstream().key_value(subjects.KV_BUCKET)
    await sim.put_status(kv, sim.node_status("hist-1", revision=head))

    async def row() -> dict[str, Any] | None:
        rows = (await http.get("/api/fleet")).json()["rollouts"]
        return next((r for r in rows if r["revision"] == head and r["commit"]), None)
    found = await eventually_async(row, what="the rollout row's commit")
    assert found is not None and found["commit"]["subject"] == "add the api"


async def test_openapi_lists_the_new_routes(http: httpx.AsyncClient) -> None:
    paths = (await http.get("/api/openapi.json")).json()["paths"]
    for path in ("/api/apps/{app}/spec", "/api/apps/{app}/logs", "/api/nodes/{node}/graph",
                 "/api/history", "/api/nodes/{node}/forget", "/api/fleet/health"):
        assert path in paths, path


def test_token_file_and_flags_make_the_config(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("- {name: olga, token: operator-token-1234, role: operator}\n"
                    "- {name: vera, token: viewer-token-5678, role: viewer}\n")
    args = build_parser().parse_args(["console", "--nats", "nats://x:4222", "--tokens",
                                      str(path), "--repo", "/srv/specs.git", "--branch", "prod"])
    config = config_from_args(args)
    config.check()
    assert [(t.name, t.role) for t in config.tokens] == [("olga", "operator"), ("vera", "viewer")]
    assert (config.repo, config.branch) == ("/srv/specs.git", "prod")
    assert "operator-token" not in repr(config.tokens)
    for bad, why in (("[]", "expected a list"),
                     ('[{"name": "a", "token": "short", "role": "operator"}]', "at least"),
                     ('[{"name": "a", "token": "long-enough-token", "role": "admin"}]',
                      "viewer or operator")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=why):
            config_from_args(args)
    viewers_only = ConsoleConfig(tokens=parse_tokens(json.dumps(TOKENS[1:])))
    with pytest.raises(ValueError, match="no token is set"):
        viewers_only.check()
