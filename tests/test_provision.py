"""Provisioning: the one builder of stream/bucket configs, `nats-init`, and what agents, the CLI
and the console do with a hostile stream someone else created first (real nats-server)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import sim
from conftest import NatsServer, eventually_async, free_port, start_nats
from fake_agent import FakeAgent

from console.app import ConsoleConfig
from reconciler.core.status import NodeStatus
from reconciler.mesh.link import Mesh, NatsOptions
from reconciler.mesh.provision import desired, differences, events_stream, nodes_bucket
from reconciler.mesh.subjects import EVENTS_STREAM, KV_BUCKET
from reconciler.node.store import Store

PY = sys.executable


def gitops(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GITOPS_MESH_")}
    return subprocess.run([PY, "-m", "reconciler", *args, "--nats", url], capture_output=True,
                          text=True, timeout=60, env=env)


async def agitops(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """gitops() without blocking this test's event loop (the node under test runs in it)."""
    return await asyncio.to_thread(gitops, url, *args)


def hostile_events_config() -> Any:
    """What a node's credentials could create first before nats-init existed."""
    config = events_stream().config
    return config.evolve(subjects=["gitops.events.>", "gitops.rpc.>"], max_msgs=3)


def test_the_builder_matches_itself_and_names_each_difference() -> None:
    for wanted in desired(replicas=3):
        assert differences(wanted, wanted.config, replicas=True) == []
    assert differences(events_stream(), hostile_events_config()) == [
        "subjects is gitops.events.>, gitops.rpc.> (documented: gitops.events.>)",
        "max_msgs is 3 (documented: -1)",
    ]
    assert differences(nodes_bucket(3), nodes_bucket(1).config) == []  # replicas: nats-init's
    assert differences(nodes_bucket(3), nodes_bucket(1).config, replicas=True) == [
        "num_replicas is 1 (documented: 3)"]


def test_nats_init_creates_then_finds_everything_matching(tmp_path: Path) -> None:
    server = start_nats(tmp_path)
    try:
        first = gitops(server.url, "nats-init")
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines() == [
            "stream GITOPS_EVENTS created", "bucket gitops_nodes created",
            "bucket gitops_rollouts created",
            "ok: 3 streams/buckets as documented (1 replica(s))"]
        again = gitops(server.url, "nats-init")
        assert (again.returncode, again.stdout.splitlines()[:3]) == (0, [
            "stream GITOPS_EVENTS matching", "bucket gitops_nodes matching",
            "bucket gitops_rollouts matching"])
        three = gitops(server.url, "nats-init", "--replicas", "3")
        assert three.returncode == 1  # one server cannot hold 3 replicas: reported, not changed
        assert "num_replicas is 1 (documented: 3)" in three.stdout
        assert "re-run with --update" in three.stderr
    finally:
        server.stop()


async def test_a_hostile_stream_is_reported_everywhere_and_never_answers_rpc(
    tmp_path: Path,
) -> None:
    server = start_nats(tmp_path)
    nc = await nats.connect(server.url)
    await nc.jetstream().add_stream(hostile_events_config())
    store = Store(tmp_path / "n1")
    agent = FakeAgent(store, "n1")
    agent.record("node.started")
    mesh = Mesh(agent, store, NatsOptions(servers=[server.url]), heartbeat=1.0)
    await mesh.start()
    console = sim.ConsoleThread(ConsoleConfig(read_only=True), sim.connector_for(server.url),
                                free_port()).start()
    try:
        # the node: loud in its log, its status message and a status field
        await eventually_async(lambda: _true(mesh.ready and mesh.problems),
                               what="the node found the stream's settings wrong")
        kv = await nc.jetstream().key_value(KV_BUCKET)

        async def reported() -> NodeStatus | None:
            entry = await kv.get("n1")
            status = NodeStatus.from_json(entry.value) if entry.value else None
            return status if status and status.mesh_problems else None

        status = await eventually_async(reported, what="the problem in the node's KV status")
        assert status is not None
        assert "subjects is gitops.events.>, gitops.rpc.>" in status.message
        assert "max_msgs is 3" in status.message and "nats-init" in status.message

        # the CLI: the node's own answers, never the stream's ack (was a pydantic error and a
        # KeyError 'node')
        one = await agitops(server.url, "status", "--node", "n1", "--json")
        assert one.returncode == 0, one.stderr
        assert json.loads(one.stdout)["node"] == "n1"
        ran = await agitops(server.url, "reconcile", "--node", "n1")
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.split()[0] == "n1"
        ghost = await agitops(server.url, "status", "--node", "ghost")
        assert ghost.returncode == 1 and "Traceback" not in ghost.stderr
        assert "only JetStream stream GITOPS_EVENTS answered" in ghost.stderr
        ghost = await agitops(server.url, "reconcile", "--node", "ghost", "--timeout", "1s")
        assert ghost.returncode == 1 and "Traceback" not in ghost.stderr

        # the console: /api/health and the banner's data
        async with httpx.AsyncClient(base_url=console.url, timeout=10) as http:
            async def health() -> Any:
                h = (await http.get("/api/health")).json()
                return h if h["mismatch"] else None

            h = await eventually_async(health, what="the console reports the mismatch")
            assert "stream GITOPS_EVENTS differs" in h["mismatch"]
            assert "max_msgs is 3" in h["mismatch"]
            overview = (await http.get("/api/fleet")).json()
            assert "max_msgs is 3" in overview["feed"]["mismatch"]

        # nats-init: reports, exits 1, changes nothing without --update
        init = gitops(server.url, "nats-init")
        assert init.returncode == 1
        assert "stream GITOPS_EVENTS differs: subjects is gitops.events.>, gitops.rpc.>" \
            in init.stdout
        info = await nc.jetstream().stream_info(EVENTS_STREAM)
        assert info.config.max_msgs == 3
        fixed = gitops(server.url, "nats-init", "--update")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert "stream GITOPS_EVENTS updated" in fixed.stdout
        info = await nc.jetstream().stream_info(EVENTS_STREAM)
        assert (info.config.subjects, info.config.max_msgs) == (["gitops.events.>"], -1)
    finally:
        console.stop()
        await mesh.close()
        store.close()
        await nc.close()
        server.stop()


async def test_dev_mode_creates_what_is_missing_with_a_warning(
    nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    store = Store(tmp_path / "n1")
    agent = FakeAgent(store, "dev1")
    agent.record("node.started")
    mesh = Mesh(agent, store, NatsOptions(servers=[nats_server.url]))
    with caplog.at_level("WARNING", logger="reconciler.mesh.provision"):
        await mesh.start()
        try:
            await eventually_async(lambda: _true(store.outbox_stats()[0] == 0),
                                   what="published into a stream it created")
        finally:
            await mesh.close()
            store.close()
    assert not mesh.problems
    warnings = [r.getMessage() for r in caplog.records]
    assert any("stream GITOPS_EVENTS did not exist" in w and "nats-init" in w for w in warnings)


async def _true(value: object) -> object:
    return value
