"""Multi-site through a NATS leaf node: a hub with JetStream (domain `hub`) and a site server
without JetStream, both run from deploy/nats/*.conf; a real agent connected only to the site
server publishes into the hub's stream and bucket, answers RPC from the hub, and loses
nothing while the site's link to the hub is down."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from conftest import (
    ConfiguredServer,
    SpecRepo,
    eventually_async,
    free_port,
    make_spec_repo,
    sample_config,
)
from nats.aio.client import Client as NATS

from console.cli import nats_connector
from console.feed import Feed
from console.fleet import Fleet
from reconciler.cli.main import parse_args
from reconciler.cli.mesh_cmds import fleet_reconcile
from reconciler.core.events import Event
from reconciler.core.status import NodeStatus
from reconciler.mesh.client import call
from reconciler.mesh.conn import MeshError, NatsOptions
from reconciler.mesh.direct import direct_last_values
from reconciler.mesh.subjects import EVENTS_STREAM, KV_BUCKET

PY = sys.executable
DEPLOY = Path(__file__).parent.parent / "deploy" / "nats"
NODE = "edge-1"
PASSWORD = "gitops-pw-leaf-test"
SECRETS = {
    "GITOPS_NATS_PASSWORD": PASSWORD,
    "GITOPS_LEAF_PASSWORD": "site-pw-leaf-test",
    "NATS_SYS_PASSWORD": "sys-pw-leaf-test",
}
CONTRACT_FIELDS = {"id", "type", "node", "time"}  # + revision where it applies (below)


def web_yaml(version: str) -> str:
    return f"""\
name: web
version: "{version}"
run:
  command: [{json.dumps(PY)}, "-c", "import time; time.sleep(3600)"]
health:
  start_timeout: 5s
"""


class Server(ConfiguredServer):
    """The hub or the site server, with the test's user in its URL."""

    def url(self, password: str = PASSWORD) -> str:
        return f"nats://gitops:{password}@127.0.0.1:{self.port}"


@dataclass
class Site:
    hub: Server
    leaf: Server
    repo: SpecRepo
    agent: subprocess.Popen[bytes]
    agent_log: Path


def hub_and_leaf(root: Path) -> tuple[Server, Server]:
    hub_port, leaf_listen, site_port = free_port(), free_port(), free_port()
    env = {**os.environ, **SECRETS,
           "GITOPS_HUB_LEAF_URL": f"nats-leaf://site:{SECRETS['GITOPS_LEAF_PASSWORD']}"
                                  f"@127.0.0.1:{leaf_listen}"}
    hub_conf, leaf_conf = root / "hub.conf", root / "leaf.conf"
    hub_conf.write_text(sample_config("hub.conf", {
        "listen: 0.0.0.0:4222": f"listen: 127.0.0.1:{hub_port}",
        "listen: 0.0.0.0:7422": f"listen: 127.0.0.1:{leaf_listen}",
        "store_dir: /var/lib/nats": f"store_dir: {json.dumps(str(root / 'js'))}",
    }))
    leaf_conf.write_text(sample_config("leaf.conf", {
        "listen: 0.0.0.0:4222": f"listen: 127.0.0.1:{site_port}",
    }))
    return Server(hub_conf, hub_port, env), Server(leaf_conf, site_port, env)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GITOPS_MESH_")}
    return subprocess.run([PY, "-m", "reconciler", *args], capture_output=True, text=True,
                          timeout=60, env={**clean, **(env or {})})


async def hub_events(hub: NATS) -> list[tuple[str, dict[str, Any], str | None]]:
    """Every event in the hub's stream, in order: (subject, body, Nats-Msg-Id)."""
    js = hub.jetstream()
    last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
    out = []
    for seq in range(1, last + 1):
        msg = await js.get_msg(EVENTS_STREAM, seq)
        out.append((msg.subject or "", json.loads(msg.data or b"{}"),
                    (msg.headers or {}).get("Nats-Msg-Id")))
    return out


async def hub_status(hub: NATS) -> NodeStatus | None:
    """The node's status in the hub's bucket (None if absent or the hub is away)."""
    try:
        kv = await hub.jetstream().key_value(KV_BUCKET)
        entry = await kv.get(NODE)
    except nats.errors.Error:  # not there yet, or the hub is restarting
        return None
    return NodeStatus.from_json(entry.value) if entry.value else None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("leafnode")
    hub, leaf = hub_and_leaf(root)
    hub.start()
    leaf.start()
    repo = make_spec_repo(root / "specs", {"apps/web.yaml": web_yaml("1")})
    log_path = root / "agent.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    agent = subprocess.Popen(
        [PY, "-m", "reconciler", "node", "--repo", repo.url, "--node-id", NODE,
         "--label", "site=edge", "--state-dir", str(root / "state"),
         "--nats", f"nats://127.0.0.1:{leaf.port}", "--nats-user", "gitops",
         "--nats-js-domain", "hub",
         "--interval", "1h", "--heartbeat", "1s", "--stop-apps-on-exit"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("GITOPS_MESH_")},
             "GITOPS_MESH_NATS_PASSWORD": PASSWORD},
    )
    try:
        yield Site(hub, leaf, repo, agent, log_path)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
        log.close()
        leaf.stop()
        hub.stop()


@pytest.fixture
async def hub(site: Site) -> AsyncIterator[NATS]:
    nc = await nats.connect(site.hub.url(), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    yield nc
    await nc.close()


async def synced_at(hub: NATS, site: Site, revision: str) -> NodeStatus:
    async def check() -> NodeStatus | None:
        assert site.agent.poll() is None, site.agent_log.read_text()[-3000:]
        status = await hub_status(hub)
        ok = status and status.status == "synced" and status.revision == revision
        return status if ok else None

    status = await eventually_async(check, timeout=20, what=f"{NODE} synced at {revision[:8]} "
                                    "in the hub's KV")
    assert status is not None
    return status


def test_a_js_domain_is_one_subject_token() -> None:
    opts = NatsOptions(js_domain="hub")
    assert opts.kv_put_subject("gitops_nodes", "n1") == "$JS.hub.API.$KV.gitops_nodes.n1"
    assert NatsOptions().kv_put_subject("gitops_nodes", "n1") == "$KV.gitops_nodes.n1"
    with pytest.raises(MeshError, match=r"--nats-js-domain 'a\.b'"):
        NatsOptions(js_domain="a.b").connect_kwargs()
    bad = cli("status", "--nats", "nats://127.0.0.1:1", "--nats-js-domain", "hub >")
    assert bad.returncode == 2
    assert "--nats-js-domain 'hub >': expected letters, digits" in bad.stderr


async def test_edge_agent_reports_events_and_status_to_the_hub(site: Site, hub: NATS) -> None:
    status = await synced_at(hub, site, site.repo.head())
    assert (status.node, status.labels, [a.name for a in status.apps]) == (
        NODE, {"site": "edge"}, ["web"])
    async def deployed() -> list[tuple[str, dict[str, Any], str | None]] | None:
        try:
            events = await hub_events(hub)
        except nats.errors.Error:
            return None
        return events if any(b["type"] == "reconcile.finished" for _, b, _ in events) else None

    events = await eventually_async(deployed, timeout=10, what="events in the hub stream")
    assert events is not None
    ids = [body["id"] for _, body, _ in events]
    assert len(ids) == len(set(ids)), "an event landed twice"
    for subject, body, msg_id in events:
        assert body.keys() >= CONTRACT_FIELDS
        Event.model_validate(body)  # the wire shape, nothing extra
        if body["type"] in ("reconcile.finished", "app.deployed"):
            assert body["revision"] == site.repo.head()
        assert (subject, msg_id, body["node"]) == (f"gitops.events.{NODE}.{body['type']}",
                                                   body["id"], NODE)
    types = [body["type"] for _, body, _ in events]
    assert {"reconcile.started", "app.deployed", "reconcile.finished"} <= set(types)

    # a re-send from the site (an ack lost on the link) is dropped by the hub's stream
    site_nc = await nats.connect(site.leaf.url())
    try:
        subject, body, msg_id = events[0]
        ack = await site_nc.jetstream(domain="hub").publish(
            subject, json.dumps(body).encode(), headers={"Nats-Msg-Id": msg_id or ""})
        assert (ack.stream, ack.duplicate) == (EVENTS_STREAM, True)
    finally:
        await site_nc.close()


async def test_rpc_and_fleet_trigger_reach_the_edge_from_the_hub(site: Site, hub: NATS) -> None:
    await synced_at(hub, site, site.repo.head())
    reply = await call(hub, NODE, "status")
    assert (reply["node"], reply["status"]) == (NODE, "synced")
    replies = await fleet_reconcile(hub, None, timeout=5)
    assert [r["node"] for r in replies] == [NODE]
    # the site's own tools see the hub's bucket through the domain (env, as in node.env)
    table = cli("status", "--nats", site.leaf.url(), env={"GITOPS_MESH_NATS_JS_DOMAIN": "hub"})
    assert table.returncode == 0, table.stderr
    assert NODE in table.stdout and "synced" in table.stdout
    # without the domain, the site server has no JetStream to offer: a clear error, no trace
    table = cli("status", "--nats", site.leaf.url())
    assert (table.returncode, table.stderr.strip()) == (2, (
        "gitops-mesh: no JetStream answers on this server (if it is a leaf node server, "
        "set --nats-js-domain to the hub's JetStream domain)"))


async def test_wait_at_the_hub_after_a_push_notified_at_the_hub(site: Site, hub: NATS) -> None:
    await synced_at(hub, site, site.repo.head())
    site.repo.write("apps/web.yaml", web_yaml("2"))
    revision = site.repo.commit_and_push("web 2")
    notified = cli("notify", "--nats", site.hub.url(), "--repo", site.repo.url,
                   "--branch", "main", "--revision", revision)
    assert notified.returncode == 0, notified.stderr
    done = cli("wait", "--nats", site.hub.url(), "--revision", revision, "--timeout", "20s")
    assert done.returncode == 0, done.stderr + site.agent_log.read_text()[-2000:]
    assert done.stdout.strip() == f"{revision[:12]}: synced on 1 node(s): {NODE}"
    # CI at the site: the same wait through the site server, addressing the hub's domain
    done = cli("wait", "--nats", site.leaf.url(), "--nats-js-domain", "hub",
               "--revision", revision, "--timeout", "20s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{revision[:12]}: synced on 1 node(s): {NODE}"
    # what `wait` and `status` read first: the hub's replicas answer a direct get across
    # the leaf connection, addressed to the hub's domain
    nc = await nats.connect(site.leaf.url())
    try:
        read = await direct_last_values(nc, KV_BUCKET, None, "hub")
    finally:
        await nc.close()
    assert read is not None and read[NODE].value is not None
    assert NodeStatus.from_json(read[NODE].value).revision == revision


async def test_console_feed_at_the_site_reads_the_hub(site: Site, hub: NATS) -> None:
    revision = site.repo.head()
    await synced_at(hub, site, revision)
    # the connector `gitops-mesh console --nats <site> --nats-js-domain hub` builds
    args = parse_args(["console", "--nats", site.leaf.url(), "--nats-js-domain", "hub",
                       "--insecure"])
    fleet = Fleet()
    feed = Feed(fleet, nats_connector(args), create_missing=False)
    assert feed.js_domain == "hub"
    task = asyncio.create_task(feed.run())
    try:
        async def seen() -> bool:
            node = fleet.nodes.get(NODE)
            return node is not None and node.revision == revision and fleet.events_total > 0
        await eventually_async(seen, timeout=10, what="the site console sees the hub's data")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # a console at the site that forgot the domain says so instead of showing an empty fleet
    feed = Feed(Fleet(), nats_connector(parse_args(["console", "--nats", site.leaf.url()])),
                create_missing=False)
    task = asyncio.create_task(feed.run())
    try:
        async def told() -> bool:
            return feed.state == "waiting" and "set --nats-js-domain" in (feed.last_error or "")
        await eventually_async(told, timeout=10, what="the feed names the missing domain")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_hub_outage_loses_nothing(site: Site, hub: NATS) -> None:
    await synced_at(hub, site, site.repo.head())
    site.hub.stop()
    # the site keeps working on its own: a push reconciled over RPC through the site server
    site.repo.write("apps/web.yaml", web_yaml("3"))
    revision = site.repo.commit_and_push("web 3 while the hub is down")
    local = await nats.connect(site.leaf.url())
    try:
        run = await call(local, NODE, "reconcile", {"reason": "test"}, timeout=10)
        assert run["node"] == NODE
        run_id = run["run_id"]

        async def waiting() -> bool:
            status = await call(local, NODE, "status")
            return bool(status["revision"] == revision and status["status"] == "synced"
                        and status["outbox_backlog"] > 0)

        await eventually_async(waiting, timeout=15, what="synced, events held in the outbox")
    finally:
        await local.close()
    site.hub.start()
    status = await synced_at(hub, site, revision)

    async def drained() -> list[dict[str, Any]] | None:
        current = await hub_status(hub)
        if current is None or current.outbox_backlog:
            return None
        try:
            events = [body for _, body, _ in await hub_events(hub)]
        except nats.errors.Error:
            return None
        later = [e for e in events if e.get("run_id") == run_id]
        return events if any(e["type"] == "reconcile.finished" for e in later) else None

    events = await eventually_async(drained, timeout=15, what="the outbox drained into the hub")
    assert events is not None
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "an event landed twice"
    # every event of the run made while the hub was down, once, in order
    at_outage = [e for e in events if e.get("run_id") == run_id]
    assert [(e["type"], e.get("app")) for e in at_outage
            if e["type"] != "app.health-changed"] == [
        ("reconcile.started", None), ("source.fetched", None), ("app.upgraded", "web"),
        ("reconcile.finished", None),
    ]
    assert at_outage[-1]["revision"] == revision
    assert PASSWORD not in site.agent_log.read_text()
    assert status.outbox_dropped == 0
