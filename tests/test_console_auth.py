"""The real console with the least-privilege `console` identity from `gitops-mesh nats-config`:
it creates the stream and bucket on an empty server, follows a node writing with its own
identity (and does not believe that node's event claiming another node), and reaches that
node's RPC, without a single permission violation."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import sim

from console.app import ConsoleConfig
from console.cli import nats_connector
from reconciler.core.events import make_event
from reconciler.mesh.link import NatsOptions, connect
from tests.conftest import eventually_async, free_port, start_nats

TOKEN = "auth-test-token"


async def test_console_works_with_its_least_privilege_identity(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gitops_mesh.console.feed")
    out = tmp_path / "auth"
    subprocess.run([sys.executable, "-m", "reconciler", "nats-config", "--node", "n1",
                    "--out", str(out)], check=True, capture_output=True)
    server = start_nats(tmp_path, 'include "auth/auth.conf"\n')
    # the console may not create the stream: the admin identity provisions it (nats-init)
    subprocess.run([sys.executable, "-m", "reconciler", "nats-init", "--nats", server.url,
                    "--nats-nkey", str(out / "admin.nk")], check=True, capture_output=True)
    args = argparse.Namespace(nats=server.url, nats_nkey=str(out / "console.nk"))
    console = sim.ConsoleThread(ConsoleConfig(token=TOKEN), nats_connector(args),
                                free_port()).start()
    node_errors: list[str] = []

    async def on_node_error(exc: Exception) -> None:
        node_errors.append(str(exc))

    nc = await connect(NatsOptions(servers=[server.url], nkey_seed_file=str(out / "n1.nk"),
                                   inbox_prefix="_INBOX.n1"), error_cb=on_node_error)
    try:
        async with httpx.AsyncClient(base_url=console.url, timeout=10) as http:
            async def live() -> bool:
                return (await http.get("/api/health")).json()["state"] == "live"
            await eventually_async(live, what="the console follows the stream")

            js = nc.jetstream()
            kv = await js.key_value("gitops_nodes")  # made by nats-init
            await sim.put_status(kv, sim.node_status("n1", labels={"role": "edge"}))
            # n1's permissions allow its own subjects only, but a body can claim any node
            forged = make_event("reconcile.finished", "n2", datetime.now(UTC),
                                revision="c" * 40, outcome="success")
            await js.publish("gitops.events.n1.reconcile.finished", forged.to_json_bytes(),
                             headers={"Nats-Msg-Id": forged.id})
            await sim.publish_many(js, sim.reconcile_events("n1", "c" * 40, datetime.now(UTC)))
            node = await sim.FakeNode(nc, "n1", {"role": "edge"}).start()

            async def n1_seen() -> bool:
                view = (await http.get("/api/nodes/n1")).json()
                return view["card"]["status"] == "synced" and len(view["events"]) == 3
            await eventually_async(n1_seen, what="the console sees n1's status and events")
            assert (await http.get("/api/events?node=n2")).json() == []
            assert (await http.get("/api/health")).json()["forged"] == 1

            res = await http.post("/api/nodes/n1/reconcile",
                                  headers={"Authorization": f"Bearer {TOKEN}"})
            assert (res.status_code, res.json()["run_id"]) == (200, "n1-run-1")
            res = await http.post("/api/fleet/reconcile",
                                  headers={"Authorization": f"Bearer {TOKEN}"})
            assert [r["node"] for r in res.json()["replies"]] == ["n1"]
            await node.stop()
    finally:
        await nc.close()
        console.stop()
        server.stop()
    violations = [r.getMessage() for r in caplog.records if "ermission" in r.getMessage()]
    assert (violations, node_errors) == ([], [])
