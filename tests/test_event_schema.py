"""The event schema version: every event says `"schema": 1`, `schema --events` describes them,
and consumers (console intake, `wait`) still read events of older agents without the field."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime

from conftest import NatsServer

from console.fleet import Fleet
from reconciler.cli.wait_cmd import wait_for_revision
from reconciler.core.events import EVENT_TYPES, Event, make_event
from reconciler.core.status import AppStatus, NodeStatus
from reconciler.mesh.link import NatsOptions, connect

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
# what an agent from before the field published (byte for byte: no "schema")
OLD_EVENT = {"id": "old1", "type": "app.deployed", "node": "old-n1",
             "time": "2026-03-01T09:00:00.000Z", "revision": "a" * 40, "app": "web",
             "version": "1"}


def test_every_event_carries_schema_1_first() -> None:
    event = make_event("app.deployed", "n1", NOW, app="web")
    data = json.loads(event.to_json_bytes())
    assert data["schema"] == 1 and next(iter(data)) == "schema"
    assert event.model_dump(mode="json", exclude_none=True)["schema"] == 1


def test_older_and_newer_events_are_read() -> None:
    old = Event.model_validate_json(json.dumps(OLD_EVENT))
    assert old.schema_version == 1 and old.app == "web"
    # a newer agent may add an optional field within schema 1: it is ignored, not refused
    newer = Event.model_validate({**OLD_EVENT, "schema": 1, "zone": "eu-1"})
    assert newer.id == "old1"
    fleet = Fleet()
    assert fleet.apply_event("gitops.events.old-n1.app.deployed",
                             json.dumps(OLD_EVENT).encode()) is None
    assert fleet.apply_event("gitops.events.old-n1.app.deployed", json.dumps(
        {**OLD_EVENT, "id": "new1", "schema": 1, "zone": "eu-1"}).encode()) is None
    assert [e["id"] for e in fleet.event_log()] == ["new1", "old1"]
    assert fleet.rejected == 0


def test_schema_events_prints_the_json_schema_of_events() -> None:
    done = subprocess.run([sys.executable, "-m", "reconciler", "schema", "--events"],
                          capture_output=True, text=True, check=True)
    schema = json.loads(done.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    props = schema["properties"]
    assert props["schema"] == {"default": 1, "minimum": 1, "title": "Schema",
                               "type": "integer"}
    assert set(schema["required"]) == {"id", "type", "node", "time"}
    assert {"revision", "app", "version", "from_version", "outcome", "duration_ms",
            "message", "run_id", "trace_id", "data"} <= set(props)
    assert props["type"]["examples"] == list(EVENT_TYPES)
    assert "node.reconfigured" in EVENT_TYPES
    assert schema.get("additionalProperties") is not False  # additive fields keep schema 1
    app_schema = json.loads(subprocess.run(
        [sys.executable, "-m", "reconciler", "schema"], capture_output=True, text=True,
        check=True).stdout)
    assert app_schema["title"] == "gitops-mesh app"  # the default is still the app document
    both = subprocess.run([sys.executable, "-m", "reconciler", "schema", "--events", "--nope"],
                          capture_output=True, text=True)
    assert both.returncode == 2


async def test_wait_accepts_a_fleet_of_older_agents(nats_server: NatsServer) -> None:
    """An agent from before the field: events without `schema` in the stream, its status in
    the KV; `wait` (which judges by the KV status) and the stream take them as they are."""
    nc = await connect(NatsOptions(servers=[nats_server.url]))
    try:
        js = nc.jetstream()
        await js.add_stream(name="GITOPS_EVENTS", subjects=["gitops.events.>"])
        kv = await js.create_key_value(bucket="gitops_nodes", history=5)
        await js.publish("gitops.events.old-n1.app.deployed", json.dumps(OLD_EVENT).encode(),
                         headers={"Nats-Msg-Id": "old1"})
        status = NodeStatus(
            node="old-n1", labels={"gen": "old"}, revision=OLD_EVENT["revision"],
            status="synced", message="all apps running and healthy",
            apps=[AppStatus(name="web", version="1", phase="running", health="healthy")],
            updated_at=datetime.now(UTC).isoformat(), heartbeat_interval_s=10.0)
        await kv.put("old-n1", status.to_json_bytes())
        from reconciler.core.spec import Selector

        code = await wait_for_revision(nc, "a" * 12, Selector(match={"gen": "old"}), [],
                                       time.monotonic() + 10)
        assert code == 0
        stored = await js.get_last_msg("GITOPS_EVENTS", "gitops.events.old-n1.app.deployed")
        assert Event.model_validate_json(stored.data or b"").schema_version == 1
    finally:
        await nc.close()
