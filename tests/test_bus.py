"""The mesh against a real nats-server: events, status KV, RPC, discovery, fleet/push triggers.

Agents here are tests/fake_agent.FakeAgent over a real reconciler.node.store.Store outbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from conftest import (
    NatsServer,
    SpecRepo,
    eventually,
    eventually_async,
    free_port,
    make_spec_repo,
    start_nats,
)
from fake_agent import FakeAgent
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from reconciler.cli.mesh_cmds import fleet_reconcile
from reconciler.core.spec import Selector
from reconciler.core.status import NodeStatus
from reconciler.mesh.link import Mesh, NatsOptions, connect
from reconciler.mesh.subjects import (
    EVENTS_STREAM,
    KV_BUCKET,
    SOURCE_CHANGED,
    node_events_subject,
    rpc_subject,
)
from reconciler.mesh.wire import SourceChanged
from reconciler.node.store import Store

TESTS = Path(__file__).parent


@asynccontextmanager
async def running(
    tmp: Path, url: str, node: str, labels: dict[str, str] | None = None,
    repo: str = "", branch: str = "main", heartbeat: float = 10.0,
) -> AsyncIterator[tuple[FakeAgent, Mesh]]:
    store = Store(tmp / f"state-{node}")
    agent = FakeAgent(store, node, labels, repo_url=repo, branch=branch)
    mesh = Mesh(agent, store, NatsOptions(servers=[url]), heartbeat=heartbeat)
    await mesh.start()
    await eventually_async(lambda: _async(mesh.ready), what=f"{node} mesh ready")
    try:
        yield agent, mesh
    finally:
        await mesh.close()
        store.close()


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[NATS]:
    nc = await connect(NatsOptions(servers=[nats_server.url]))
    yield nc
    await nc.close()


async def stream_events(nc: NATS, node: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """Every stored event of `node`, in stream order: (payload, headers)."""
    js = nc.jetstream()
    subject = node_events_subject(node)
    try:
        info = await js.stream_info(EVENTS_STREAM, subjects_filter=subject)
    except nats.js.errors.NotFoundError:
        return []
    count = sum((info.state.subjects or {}).values())
    if not count:
        return []
    sub = await js.subscribe(subject, ordered_consumer=True)
    out = []
    for _ in range(count):
        msg = await sub.next_msg(timeout=5)
        out.append((json.loads(msg.data), dict(msg.headers or {})))
    await sub.unsubscribe()
    return out


async def kv_status(nc: NATS, node: str) -> NodeStatus | None:
    try:
        kv = await nc.jetstream().key_value(KV_BUCKET)
        entry = await kv.get(node)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
        return None
    return NodeStatus.from_json(entry.value or b"{}")


async def request(nc: NATS, node: str, endpoint: str, body: bytes = b"") -> tuple[Any, dict]:
    msg = await nc.request(rpc_subject(node, endpoint), body, timeout=5)
    headers = dict(msg.headers or {})
    return (json.loads(msg.data) if msg.data else None), headers


async def test_events_reach_the_stream_in_order_with_msg_id(
    tmp_path: Path, nats_server: NatsServer, client: NATS
) -> None:
    store = Store(tmp_path / "state")
    agent = FakeAgent(store, "ev1")
    for i in range(40):  # a backlog from before NATS was configured
        agent.record("app.deployed", app="web", version=str(i), revision="r1")
    mesh = Mesh(agent, store, NatsOptions(servers=[nats_server.url]), batch=4)
    await mesh.start()
    for i in range(40, 60):
        agent.record("app.health-changed", app="web", message=f"change {i}")
    ids = [e.event_id for e in store.outbox_batch(100)]
    assert len(ids) == 60

    async def all_published() -> list[tuple[dict[str, Any], dict[str, str]]]:
        events = await stream_events(client, "ev1")
        assert len(events) == 60, len(events)
        return events

    events = await eventually_async(all_published, what="60 events in the stream")
    assert [e["id"] for e, _ in events] == ids
    assert [h["Nats-Msg-Id"] for _, h in events] == ids
    first = events[0][0]
    assert {k: first[k] for k in ("type", "node", "app", "version", "revision")} == {
        "type": "app.deployed", "node": "ev1", "app": "web", "version": "0", "revision": "r1",
    }
    assert first["time"].endswith("Z")
    assert store.outbox_stats() == (0, 0)
    # 15 batches, yet no subscription per batch (nats-py has no public count: peek):
    # 9 $SRV + 8 endpoints + 2 triggers + the publish_async reply inbox
    assert mesh._nc is not None and len(mesh._nc._subs) <= 21
    await mesh.close()
    store.close()


async def test_status_kv_follows_changes_and_heartbeats(
    tmp_path: Path, nats_server: NatsServer, client: NATS
) -> None:
    async with running(tmp_path, nats_server.url, "kv1", {"role": "edge"}, heartbeat=0.3) as (
        agent, _mesh,
    ):
        first = await eventually_async(lambda: kv_status(client, "kv1"))
        assert first is not None
        assert first.labels == {"role": "edge"}
        assert first.status == "synced"
        assert first.heartbeat_interval_s == 0.3
        assert first.agent_version == "fake"
        agent.suspended = True
        agent.record("app.suspended")

        async def suspended() -> bool:
            st = await kv_status(client, "kv1")
            return st is not None and st.status == "suspended"

        await eventually_async(suspended, timeout=5, what="KV shows the change")
        kv: KeyValue = await client.jetstream().key_value(KV_BUCKET)
        rev = (await kv.get("kv1")).revision or 0

        async def heartbeat() -> bool:
            entry = await kv.get("kv1")
            return (entry.revision or 0) > rev  # rewritten with nothing changed

        await eventually_async(heartbeat, timeout=5, what="a heartbeat write")
        status = await kv.status()
        assert status.history == 5


async def test_rpc_endpoints_and_bad_bodies(
    tmp_path: Path, nats_server: NatsServer, client: NATS, spec_repo: SpecRepo
) -> None:
    spec_repo.write("apps.json", json.dumps({"web": {"version": "1"}}))
    spec_repo.commit_and_push()
    async with running(tmp_path, nats_server.url, "rpc1", repo=spec_repo.url) as (agent, _):
        plan, _h = await request(client, "rpc1", "plan")
        assert plan["actions"][0]["app"] == "web" and plan["actions"][0]["kind"] == "deploy"
        reply, _h = await request(client, "rpc1", "reconcile")
        assert reply == {"node": "rpc1", "run_id": reply["run_id"]} and reply["run_id"]
        await eventually_async(lambda: _async(agent.revision == spec_repo.head()))
        status, _h = await request(client, "rpc1", "status")
        assert status["node"] == "rpc1" and status["status"] == "synced"
        assert [a["name"] for a in status["apps"]] == ["web"]
        state, _h = await request(client, "rpc1", "state")
        assert state["current"] == {"web": {"version": "1"}}
        health, _h = await request(client, "rpc1", "health", b'{"app": "web"}')
        assert health == {"node": "rpc1", "health": {"web": "healthy"}}
        reply, _h = await request(client, "rpc1", "suspend", b'{"app": "web"}')
        assert reply == {"node": "rpc1", "app": "web", "suspended": True}
        assert agent.apps["web"].suspended
        reply, _h = await request(client, "rpc1", "resume", b"{}")
        assert reply == {"node": "rpc1", "app": None, "suspended": False}

        for endpoint, body, message in [
            ("health", b'{"app": "nope"}', "unknown app 'nope'; this node has: web"),
            ("suspend", b"{not json", "invalid JSON body"),
            ("resume", b'{"app": 7}', "'app' must be a string, got int"),
            ("status", b'"x"', "body must be a JSON object, got str"),
            ("reconcile", b'{"reason": []}', "'reason' must be a string"),
            # deep nesting was a RecursionError and a 500 (issue #10.9)
            ("reconcile", b'{"reason": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
             "invalid JSON body: nested too deeply"),
            ("health", b"[" * 30_000, "invalid JSON body: nested too deeply"),
            ("status", b'{"x": "' + b"y" * 100_000 + b'"}', "body larger than 65536 bytes"),
        ]:
            _data, headers = await request(client, "rpc1", endpoint, body)
            assert headers["Nats-Service-Error-Code"] == "400", endpoint
            assert headers["Nats-Service-Error"].startswith(message), headers
        assert not agent.suspended  # nothing was touched by the bad requests
        # the service still answers after the errors
        status, headers = await request(client, "rpc1", "status")
        assert status["node"] == "rpc1" and not headers


async def _async(value: Any) -> Any:
    return value


async def test_discovery_with_srv_ping_and_info(
    tmp_path: Path, nats_server: NatsServer, client: NATS
) -> None:
    async with running(tmp_path, nats_server.url, "disc1"):
        pings: list[dict[str, Any]] = []

        async def on_ping(msg: Any) -> None:
            pings.append(json.loads(msg.data))

        inbox = client.new_inbox()
        sub = await client.subscribe(inbox, cb=on_ping)
        await client.publish("$SRV.PING.gitops-node", b"", reply=inbox)
        # every running gitops-node service answers; pick this test's node
        ping = await eventually_async(lambda: _async(next(
            (p for p in pings if p["metadata"] == {"node": "disc1"}), None)))
        await sub.unsubscribe()
        assert ping["name"] == "gitops-node" and ping["type"].endswith("ping_response")
        info = json.loads(
            (await client.request(f"$SRV.INFO.gitops-node.{ping['id']}", b"", timeout=5)).data
        )
        assert info["metadata"] == {"node": "disc1"}
        assert sorted(e["subject"] for e in info["endpoints"]) == sorted(
            rpc_subject("disc1", ep)
            for ep in ("status", "state", "plan", "reconcile", "health", "suspend", "resume",
                       "logs")
        )


async def test_fleet_trigger_reaches_only_matching_nodes(
    tmp_path: Path, nats_server: NatsServer, client: NATS
) -> None:
    async with (
        running(tmp_path, nats_server.url, "fe1", {"ft": "edge", "zone": "a"}) as (e1, _),
        running(tmp_path, nats_server.url, "fe2", {"ft": "edge", "zone": "b"}) as (e2, _),
        running(tmp_path, nats_server.url, "fg1", {"ft": "gateway"}) as (g1, _),
    ):
        for node in ("fe1", "fe2", "fg1"):
            await eventually_async(lambda n=node: kv_status(client, n))  # type: ignore[misc]
        replies = await fleet_reconcile(client, Selector(match={"ft": "edge"}), timeout=5)
        assert [r["node"] for r in replies] == ["fe1", "fe2"]
        assert all(r["run_id"] for r in replies)
        assert e1.triggers == ["fleet"] and e2.triggers == ["fleet"] and g1.triggers == []
        replies = await fleet_reconcile(
            client, Selector(**{"in": {"zone": ["b"]}}), timeout=5
        )
        assert [r["node"] for r in replies] == ["fe2"]
        # the contract's literal body: a plain label map selects like {"match": ...}
        plain: list[str] = []
        bad: list[bytes] = []
        plain_inbox, bad_inbox = client.new_inbox(), client.new_inbox()

        async def on_plain(msg: Any) -> None:
            plain.append(json.loads(msg.data)["node"])

        async def on_bad(msg: Any) -> None:
            bad.append(msg.data)

        await client.subscribe(plain_inbox, cb=on_plain)
        await client.subscribe(bad_inbox, cb=on_bad)
        await client.publish("gitops.fleet.reconcile", b'{"selector": {"ft": "edge"}}',
                             reply=plain_inbox)
        await eventually_async(lambda: _async(sorted(plain) == ["fe1", "fe2"]),
                               what="both edge nodes answer a label-map selector")
        assert g1.triggers == []
        # malformed requests are ignored, not answered (not even as "every node"), and
        # crash nothing
        for body in (b'{"selector": 5}', b'{"selector": {"ft": 5}}',
                     b'{"selector": {"match": {"ft": "edge"}, "zone": "a"}}'):
            await client.publish("gitops.fleet.reconcile", body, reply=bad_inbox)
        replies = await fleet_reconcile(client, None, timeout=1)
        assert {r["node"] for r in replies} >= {"fe1", "fe2", "fg1"}
        assert bad == []  # each node handled the bad ones before the request after them
        assert (len(e1.triggers), len(e2.triggers), len(g1.triggers)) == (3, 4, 1)


async def test_source_changed_triggers_nodes_tracking_that_repo_and_branch(
    tmp_path: Path, nats_server: NatsServer, client: NATS
) -> None:
    repo = str(tmp_path / "specs.git")
    os.makedirs(repo)
    async with (
        running(tmp_path, nats_server.url, "sc1", repo=repo) as (same, _),
        running(tmp_path, nats_server.url, "sc2", repo=repo, branch="prod") as (other_branch, _),
        running(tmp_path, nats_server.url, "sc3", repo=str(tmp_path)) as (other_repo, _),
    ):
        for node in ("sc1", "sc2", "sc3"):
            await eventually_async(lambda n=node: kv_status(client, n))  # type: ignore[misc]
        # spelled differently from the agent's URL: trailing slash, file:// and refs/heads/
        change = SourceChanged(f"file://{repo}/", "refs/heads/main", "c0ffee" * 6 + "ab")
        await client.publish(SOURCE_CHANGED, change.to_json_bytes())
        await eventually_async(lambda: _async(same.triggers), timeout=5)
        await client.flush()
        assert same.triggers == ["source.changed c0ffeec0ffee"]
        assert other_branch.triggers == [] and other_repo.triggers == []


async def test_outage_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    server = start_nats(tmp_path / "own")
    store = Store(tmp_path / "state")
    agent = FakeAgent(store, "out1")
    mesh = Mesh(agent, store, NatsOptions(servers=[server.url]), heartbeat=1.0)
    await mesh.start()
    recorded: list[str] = []

    def emit(n: int) -> None:
        for _ in range(n):
            agent.record("app.health-changed", app="web")
        recorded[:] = [*recorded, *(e.event_id for e in store.outbox_batch(10_000)
                                    if e.event_id not in recorded)]

    emit(30)
    await eventually_async(lambda: _async(store.outbox_stats()[0] == 0), what="first batch")
    server.stop()  # NATS goes away while the agent keeps recording
    for _ in range(5):
        emit(20)
        await asyncio.sleep(0.05)
    assert store.outbox_stats()[0] == 100
    await eventually_async(lambda: _async(not mesh.connected), what="disconnect noticed")
    server.start()  # same port, same JetStream store
    emit(10)
    await eventually_async(lambda: _async(store.outbox_stats()[0] == 0), timeout=20,
                           what="backlog published after the restart")
    # an agent restart re-sending an already-acked event (crash before the delete) dedupes
    with store.transaction():
        store._db.execute(
            "INSERT INTO outbox (event_id, subject, payload, created) VALUES (?,?,?,?)",
            (recorded[0], "gitops.events.out1.app.health-changed", b"{}", ""),
        )
        store._outbox_count += 1
    mesh._wake()
    await eventually_async(lambda: _async(store.outbox_stats()[0] == 0), what="resend acked")
    nc = await connect(NatsOptions(servers=[server.url]))
    events = await stream_events(nc, "out1")
    assert [e["id"] for e, _ in events] == recorded
    assert len(recorded) == 140
    await nc.close()
    await mesh.close()
    store.close()
    server.stop()


@pytest.mark.parametrize("kind", ["fake", "real"])
def test_kill9_with_a_backlog_delivers_after_restart(tmp_path: Path, kind: str) -> None:
    port = free_port()
    server = NatsServer(port=port, store_dir=tmp_path / "js")  # not started: NATS is down
    state = tmp_path / "state"
    node = f"k9-{kind}"
    if kind == "fake":
        cmd = [sys.executable, str(TESTS / "fake_agent.py"), "--nats", server.url,
               "--node-id", node, "--state-dir", str(state)]
        first_cmd = [*cmd, "--emit", "50"]
    else:  # a real agent reconciling a spec repo records its events while NATS is down
        repo = make_spec_repo(tmp_path / "specs", {
            f"apps/app{i}.yaml": f'name: app{i}\nversion: "1"\n' for i in range(5)
        })
        cmd = [sys.executable, "-m", "reconciler", "node", "--repo", repo.url, "--node-id",
               node, "--state-dir", str(state), "--nats", server.url, "--interval", "1h"]
        first_cmd = cmd
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    first = subprocess.Popen(first_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=env)
    if kind == "fake":
        assert first.stdout is not None and first.stdout.readline().strip() == b"ready"
    else:
        def reconciled() -> bool:
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            store = Store(state)
            try:
                types = [json.loads(e.payload)["type"] for e in store.outbox_batch(1000)]
            finally:
                store.close()
            return "reconcile.finished" in types

        eventually(reconciled, timeout=20, what="a reconcile recorded in the outbox")
    first.send_signal(signal.SIGKILL)
    first.wait()
    backlog = Store(state)
    ids = [e.event_id for e in backlog.outbox_batch(1000)]
    assert backlog.outbox_stats() == (len(ids), 0) and len(ids) >= (50 if kind == "fake" else 5)
    backlog.close()
    server.start()
    second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              env=env)
    try:
        async def delivered() -> list[str]:
            nc = await connect(NatsOptions(servers=[server.url]))
            try:
                got = [e["id"] for e, _ in await stream_events(nc, node)]
            finally:
                await nc.close()
            assert got[:len(ids)] == ids, (len(got), len(ids))
            return got

        got = asyncio.run(eventually_async(delivered, timeout=20))
        assert len(set(got)) == len(got)  # the restart's own events follow, no duplicates
    finally:
        second.terminate()
        second.wait(10)
        server.stop()


def _outbox(state: Path) -> list[dict[str, Any]]:
    """The events a (running) agent has not published yet, oldest first (read-only)."""
    import sqlite3

    from reconciler.node.store import db_path

    assert db_path(state).exists(), "no store yet"
    db = sqlite3.connect(f"file:{db_path(state)}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT payload FROM outbox ORDER BY seq").fetchall()
    except sqlite3.OperationalError as exc:
        # the agent creates the file a moment before its tables: not there yet
        raise AssertionError(f"no outbox yet: {exc}") from None
    finally:
        db.close()
    return [json.loads(row[0]) for row in rows]


async def test_real_agent_reconciling_through_an_outage_delivers_each_event_once(
    tmp_path: Path,
) -> None:
    """nats-server stops, a push lands, the agent's poll reconciles it while NATS is down;
    nats-server comes back on the same port and store: every event exactly once."""
    server = start_nats(tmp_path / "own")
    node = "outage-real"
    state = tmp_path / "state"
    repo = make_spec_repo(tmp_path / "specs", {
        f"apps/app{i}.yaml": f'name: app{i}\nversion: "1"\n' for i in range(3)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "node", "--repo", repo.url, "--node-id", node,
         "--state-dir", str(state), "--nats", server.url, "--interval", "1s",
         "--heartbeat", "1s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
    try:
        async def published(revision: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
            assert proc.poll() is None, "the agent exited"
            assert _outbox(state) == []
            conn = await connect(NatsOptions(servers=[server.url]))
            try:
                events = await stream_events(conn, node)
            finally:
                await conn.close()
            assert ("reconcile.finished", revision) in {
                (e["type"], e.get("revision")) for e, _ in events}
            return events

        await eventually_async(lambda: published(repo.head()), timeout=20,
                               what="the first reconcile in the stream")
        server.stop()
        for i in range(3):
            repo.write(f"apps/app{i}.yaml", f'name: app{i}\nversion: "2"\n')
        rev2 = repo.commit_and_push("every app 2")

        def reconciled_offline() -> list[dict[str, Any]]:
            assert proc.poll() is None, "the agent exited"
            held = _outbox(state)
            assert ("reconcile.finished", rev2) in {(e["type"], e.get("revision")) for e in held}
            return held

        held = await eventually_async(lambda: _async(reconciled_offline()), timeout=10,
                                      what="the poll reconciled while NATS was down")
        in_run = [(e["type"], e.get("app"), e.get("revision")) for e in held
                  if e.get("revision") == rev2]
        # independent apps are upgraded side by side: their order is the run's own
        assert in_run[:2] == [("reconcile.started", None, rev2), ("source.fetched", None, rev2)]
        assert sorted(in_run[2:5]) == [("app.upgraded", f"app{i}", rev2) for i in range(3)]
        assert in_run[5:] == [("reconcile.finished", None, rev2)]
        server.start()  # same port, same JetStream store
        events = await eventually_async(lambda: published(rev2), timeout=20,
                                        what="the backlog published after the restart")
        ids = [e["id"] for e, _ in events]
        msg_ids = [h.get("Nats-Msg-Id") for _, h in events]
        assert msg_ids == ids and len(set(ids)) == len(ids)  # each event once, by its id
        held_ids = [e["id"] for e in held]
        assert [i for i in ids if i in set(held_ids)] == held_ids  # all there, in order
        assert [(e["type"], e.get("app")) for e, _ in events if e.get("revision") == rev2] \
            == [(t, a) for t, a, _ in in_run]
    finally:
        proc.terminate()
        proc.wait(10)
        server.stop()


async def test_mesh_start_returns_at_once_without_nats(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    agent = FakeAgent(store, "nonats")
    mesh = Mesh(agent, store, NatsOptions(servers=[f"nats://127.0.0.1:{free_port()}"]))
    await asyncio.wait_for(mesh.start(), 1.0)
    agent.record("node.started")
    assert not mesh.connected
    assert store.outbox_stats() == (1, 0)  # kept for later
    await asyncio.wait_for(mesh.close(), 5.0)
    store.close()



async def test_nats_trouble_is_logged_once_not_per_retry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path / "state")
    mesh = Mesh(FakeAgent(store, "quiet"), store,
                NatsOptions(servers=[f"nats://127.0.0.1:{free_port()}"]))
    with caplog.at_level("INFO", logger="reconciler.mesh.link"):
        await mesh.start()
        await eventually_async(lambda: _async(mesh.nats_errors >= 2), what="two retries")
        await mesh.close()
    store.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("NATS at nats://127.0.0.1:")
    assert warnings[0].endswith("(retrying)")


async def test_cluster_urls_fail_over_to_a_live_server(
    tmp_path: Path, nats_server: NatsServer, client: NATS
) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    store = Store(tmp_path / "state")
    mesh = Mesh(FakeAgent(store, "cluster1"), store,
                NatsOptions(servers=[dead, nats_server.url, dead]))
    await mesh.start()
    try:
        await eventually_async(lambda: kv_status(client, "cluster1"), what="status via live URL")
    finally:
        await mesh.close()
        store.close()


async def test_outbox_backlog_and_drops_are_reported_in_status(
    tmp_path: Path, nats_server: NatsServer, client: NATS
) -> None:
    store = Store(tmp_path / "state", outbox_max=5)
    agent = FakeAgent(store, "drops1")
    for _ in range(8):  # recorded while NATS was unknown: the oldest 3 fall out
        agent.record("app.health-changed", app="web")
    mesh = Mesh(agent, store, NatsOptions(servers=[nats_server.url]))
    assert mesh.snapshot().outbox_backlog == 5
    await mesh.start()
    try:
        async def reported() -> bool:
            st = await kv_status(client, "drops1")
            return st is not None and (st.outbox_backlog, st.outbox_dropped) == (0, 3)

        await eventually_async(reported, what="backlog 0, dropped 3 in the KV")
        assert len(await stream_events(client, "drops1")) == 5
    finally:
        await mesh.close()
        store.close()


async def test_a_deleted_stream_and_bucket_are_created_again(tmp_path: Path) -> None:
    server = start_nats(tmp_path / "own")
    store = Store(tmp_path / "state")
    agent = FakeAgent(store, "re1")
    mesh = Mesh(agent, store, NatsOptions(servers=[server.url]), heartbeat=0.3)
    nc = await connect(NatsOptions(servers=[server.url]))
    try:
        agent.record("node.started")
        await mesh.start()
        await eventually_async(lambda: kv_status(nc, "re1"))
        await eventually_async(lambda: _async(store.outbox_stats()[0] == 0))
        js = nc.jetstream()
        await js.delete_stream(EVENTS_STREAM)
        await js.delete_key_value(KV_BUCKET)
        agent.record("app.deployed", app="web", version="2")

        async def back() -> bool:
            events = await stream_events(nc, "re1")
            return [e["type"] for e, _ in events] == ["app.deployed"] and bool(
                await kv_status(nc, "re1"))

        await eventually_async(back, timeout=20, what="stream and bucket re-created")
    finally:
        await nc.close()
        await mesh.close()
        store.close()
        server.stop()


async def test_a_status_too_big_for_one_message_is_still_written(tmp_path: Path) -> None:
    """Issue #10.4: a node whose status JSON exceeded the server's max_payload was never
    written, so it read as unreachable. It is written, with the apps that need attention
    first and the count of those left out."""
    from reconciler.core.status import AppStatus

    server = start_nats(tmp_path, "max_payload: 65536\n")
    try:
        async with running(tmp_path, server.url, "big") as (agent, mesh):
            for i in range(600):
                agent.apps[f"app{i:03d}"] = AppStatus(
                    name=f"app{i:03d}", version="1", phase="failed" if i == 599 else "running",
                    health="healthy", message="m" * 400, labels={"team": "x" * 60})
            assert len(agent.status().to_json_bytes()) > 65536
            mesh._wake()
            nc = await connect(NatsOptions(servers=[server.url]))
            try:
                kv = await nc.jetstream().key_value(KV_BUCKET)

                async def written() -> NodeStatus | None:
                    st = NodeStatus.from_json((await kv.get("big")).value or b"{}")
                    return st if st.apps_omitted else None

                status = await eventually_async(written, what="the big status in the KV")
                assert status is not None
                assert status.apps[0].name == "app599"  # the failed one comes first
                assert status.apps_omitted + len(status.apps) == 600
                assert status.status == "failed" and "not listed" in status.message
            finally:
                await nc.close()
    finally:
        server.stop()
