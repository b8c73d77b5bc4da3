"""The production shape: a 3-server JetStream cluster (deploy/nats/cluster/nats.conf, auth from
nats-config, provisioned by nats-init with 3 replicas), real agents, the git hook, `wait`
and the console feed; the server leading the events stream is killed mid-rollout."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from conftest import SpecRepo, eventually, make_spec_repo
from nats_cluster import Cluster, start_cluster, stream_leader

import reconciler
from console.feed import Feed
from console.fleet import Fleet
from reconciler.core.status import NodeStatus
from reconciler.mesh.conn import NatsOptions, connect
from reconciler.mesh.subjects import EVENTS_STREAM, KV_BUCKET, KV_STREAM, ROLLOUTS_STREAM

PY = sys.executable
HOOK = Path(reconciler.__file__).parent / "hooks" / "post-receive"
NODES = ["cl-1", "cl-2", "cl-3"]


def spec(version: int) -> dict[str, str]:
    return {"apps/web.yaml": f'name: web\nversion: "{version}"\n'}  # no process: fast


@dataclass
class Mesh:
    cluster: Cluster
    repo: SpecRepo
    agents: dict[str, subprocess.Popen[bytes]]
    root: Path

    def push(self, version: int) -> str:
        """Commit and push; the bare repo's hook announces it with the notifier identity."""
        self.commit(version)
        return self.publish()

    def commit(self, version: int) -> str:
        for path, text in spec(version).items():
            self.repo.write(path, text)
        from conftest import git

        git(self.repo.work, "add", "-A")
        git(self.repo.work, "commit", "-q", "-m", f"web {version}")
        return self.repo.head()

    def publish(self) -> str:
        from conftest import git

        env = self.cluster.env("notifier")
        env.update(GITOPS_MESH_NATS=self.cluster.urls, GITOPS_MESH_BIN=f"{PY} -m reconciler")
        git(self.repo.work, "push", "-q", "origin", "HEAD:main", env=env)
        return self.repo.head()

    def wait(self, revision: str, timeout: str = "60s") -> subprocess.Popen[str]:
        return subprocess.Popen(
            [PY, "-m", "reconciler", "wait", "--nats", self.cluster.urls, "--revision",
             revision, "--timeout", timeout], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=self.cluster.env("observer"))

    def log(self, node: str) -> str:
        return (self.root / f"{node}.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("cluster")
    cluster = start_cluster(root, NODES)
    agents: dict[str, subprocess.Popen[bytes]] = {}
    try:
        init = cluster.gitops("admin", "nats-init")
        assert init.returncode == 0, init.stdout + init.stderr
        repo = make_spec_repo(root / "specs", spec(0))
        shutil.copy(HOOK, repo.bare / "hooks" / "post-receive")
        for node in NODES:
            with open(root / f"{node}.log", "wb") as log:
                agents[node] = subprocess.Popen(
                    [PY, "-m", "reconciler", "node", "--repo", repo.url, "--node-id", node,
                     "--state-dir", str(root / node), "--nats", cluster.urls,
                     "--interval", "1h", "--heartbeat", "1s"],
                    stdout=log, stderr=subprocess.STDOUT, env=cluster.env(node))

        def all_reported() -> bool:
            try:
                return len(asyncio.run(_statuses(cluster))) == len(NODES)
            except nats.js.errors.KeyNotFoundError:
                return False

        # `wait` on an empty bucket exits 1 (no node matches): the tests start from a fleet
        # whose agents have all reported once, as a fleet that runs does
        eventually(all_reported, timeout=60, interval=0.2, what="every agent reported")
        yield Mesh(cluster, repo, agents, root)
    finally:
        for proc in agents.values():
            proc.send_signal(signal.SIGTERM)
        for proc in agents.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.stop()


def test_nats_init_made_everything_with_three_replicas_and_twice_is_a_no_op(mesh: Mesh) -> None:
    again = mesh.cluster.gitops("admin", "nats-init")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines() == [
        "stream GITOPS_EVENTS matching", "bucket gitops_nodes matching",
        "bucket gitops_rollouts matching",
        "ok: 3 streams/buckets as documented (3 replica(s))"]

    async def replicas() -> dict[str, int]:
        nc = await mesh.cluster.connect("admin")
        try:
            js = nc.jetstream()
            return {name: (await js.stream_info(name)).config.num_replicas or 1
                    for name in (EVENTS_STREAM, KV_STREAM, ROLLOUTS_STREAM)}
        finally:
            await nc.close()

    assert asyncio.run(replicas()) == {EVENTS_STREAM: 3, KV_STREAM: 3, ROLLOUTS_STREAM: 3}


def test_node_credentials_cannot_create_or_alter_the_stream(mesh: Mesh) -> None:
    async def attempt() -> None:
        nc = await mesh.cluster.connect("cl-1")
        try:
            js = nc.jetstream(timeout=0.5)
            config = (await js.stream_info(EVENTS_STREAM)).config
            for refused in (js.update_stream(config.evolve(subjects=["gitops.events.>",
                                                                     "gitops.rpc.>"])),
                            js.delete_stream(EVENTS_STREAM),
                            js.add_stream(config.evolve(name="HIJACK"))):
                with pytest.raises((nats.errors.TimeoutError, nats.js.errors.APIError)):
                    await refused
        finally:
            await nc.close()
        admin = await mesh.cluster.connect("admin")
        try:
            info = await admin.jetstream().stream_info(EVENTS_STREAM)
            assert info.config.subjects == ["gitops.events.>"]
        finally:
            await admin.close()

    asyncio.run(attempt())


async def _all_events(cluster: Cluster) -> list[dict[str, Any]]:
    nc = await cluster.connect("admin")
    try:
        js = nc.jetstream()
        sub = await js.subscribe("gitops.events.>", stream=EVENTS_STREAM, ordered_consumer=True)
        last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
        out = []
        while len(out) < last:
            msg = await sub.next_msg(timeout=5)
            out.append(json.loads(msg.data))
        return out
    finally:
        await nc.close()


async def _statuses(cluster: Cluster) -> dict[str, NodeStatus]:
    nc = await cluster.connect("observer")
    try:
        kv = await nc.jetstream().key_value(KV_BUCKET)
        return {n: NodeStatus.from_json((await kv.get(n)).value) for n in NODES}
    finally:
        await nc.close()


def test_killing_the_stream_leader_mid_rollout_loses_nothing(mesh: Mesh) -> None:
    cluster = mesh.cluster
    first = mesh.push(1)
    done = cluster.gitops("observer", "wait", "--revision", first, "--timeout", "60s")
    assert done.returncode == 0, done.stderr + "".join(mesh.log(n) for n in NODES)

    fleet = Fleet()
    # the console's feed runs on its own loop in a thread: live all through the failover
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="console-feed", daemon=True)
    thread.start()
    options = NatsOptions(servers=cluster.urls.split(","), nkey_seed_file=cluster.nkey("console"))

    async def console_connect(**callbacks: Any) -> Any:
        return await connect(options, **callbacks)

    feed = Feed(fleet, console_connect, create_missing=False, check_interval=0.5)

    async def start_feed() -> asyncio.Task[None]:
        return asyncio.ensure_future(feed.run())

    async def stop_feed() -> None:
        feed_task.cancel()
        await asyncio.gather(feed_task, return_exceptions=True)

    feed_task = asyncio.run_coroutine_threadsafe(start_feed(), loop).result(5)
    eventually(lambda: feed.state == "live", timeout=20, what="the console feed is live")

    second = mesh.commit(2)
    before = mesh.wait(second)  # watching already when its revision appears
    leader = asyncio.run(_leader(cluster))
    cluster.server(leader).kill()
    mesh.publish()
    after = mesh.wait(second)
    for waiter in (before, after):
        out, err = waiter.communicate(timeout=90)
        assert waiter.returncode == 0, err + "".join(mesh.log(n) for n in NODES)
        assert "Traceback" not in err
        assert out.startswith(f"{second[:12]}: synced on 3 node(s)")
    third = mesh.push(3)
    done = cluster.gitops("observer", "wait", "--revision", third, "--timeout", "60s")
    assert done.returncode == 0, done.stderr

    # every agent's outbox drained (each entry is deleted only once JetStream acked it)
    def drained() -> dict[str, NodeStatus] | None:
        statuses = asyncio.run(_statuses(cluster))
        ok = all(s.outbox_backlog == 0 and s.revision == third for s in statuses.values())
        return statuses if ok else None

    statuses = eventually(drained, timeout=30, what="every outbox drained")
    assert all(s.outbox_dropped == 0 for s in statuses.values())
    events = asyncio.run(_all_events(cluster))
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "an event was stored twice"
    for node in NODES:
        finished = {e.get("revision") for e in events
                    if e["node"] == node and e["type"] == "reconcile.finished"}
        assert {first, second, third} <= finished, f"{node} lost a reconcile.finished"
        runs = [e for e in events if e["node"] == node and e["type"] == "reconcile.started"]
        ends = {e.get("run_id") for e in events
                if e["node"] == node and e["type"] == "reconcile.finished"}
        assert all(run.get("run_id") in ends for run in runs), f"{node}: a run has no end"

    # the console followed across the failover: it saw the third revision's events
    def console_caught_up() -> bool:
        return all(fleet.nodes.get(n) is not None and fleet.nodes[n].revision == third
                   for n in NODES) and feed.last_seq >= len(events)

    try:
        eventually(console_caught_up, timeout=30, what="the console feed stayed live")
        assert feed.state == "live"
    finally:
        asyncio.run_coroutine_threadsafe(stop_feed(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        cluster.server(leader).start()


async def _leader(cluster: Cluster) -> str:
    nc = await cluster.connect("admin")
    try:
        return await stream_leader(nc, EVENTS_STREAM)
    finally:
        await nc.close()

