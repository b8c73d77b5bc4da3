"""Simulated fleet traffic for tests, benchmarks and screenshots: writes status and events
into NATS exactly the way agents do (KV put of NodeStatus JSON, JetStream publish of Event
JSON on gitops.events.<node>.<type> with Nats-Msg-Id)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from console.feed import EVENTS_DUPLICATE_WINDOW_S, EVENTS_MAX_AGE_S, KV_HISTORY
from reconciler import subjects
from reconciler.events import Event, iso_time, make_event
from reconciler.status import AppStatus, NodeStatus


async def ensure(js: JetStreamContext) -> KeyValue:
    """The events stream and the status bucket (created like agents create them)."""
    try:
        await js.stream_info(subjects.EVENTS_STREAM)
    except Exception:
        await js.add_stream(name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_SUBJECTS],
                            max_age=EVENTS_MAX_AGE_S,
                            duplicate_window=EVENTS_DUPLICATE_WINDOW_S)
    try:
        return await js.key_value(subjects.KV_BUCKET)
    except Exception:
        return await js.create_key_value(bucket=subjects.KV_BUCKET, history=KV_HISTORY)


async def put_status(kv: KeyValue, status: NodeStatus) -> None:
    await kv.put(status.node, status.to_json_bytes())


async def publish_event(js: JetStreamContext, event: Event) -> None:
    await js.publish(event.subject, event.to_json_bytes(), headers={"Nats-Msg-Id": event.id})


async def publish_many(js: JetStreamContext, events: list[Event], window: int = 500) -> None:
    """Pipelined publishes (many acks in flight), like the agents' outbox publisher."""
    pending: list[asyncio.Future[Any]] = []
    for event in events:
        pending.append(await js.publish_async(
            event.subject, event.to_json_bytes(), headers={"Nats-Msg-Id": event.id}))
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


def node_status(node: str, state: str = "synced", *, revision: str = "a" * 40,
                labels: dict[str, str] | None = None, apps: int = 3,
                now: datetime | None = None, **fields: Any) -> NodeStatus:
    """A plausible status of one node running `apps` apps."""
    now = now or datetime.now(UTC)
    names = ["web", "api", "worker", "cache", "metrics", "proxy"]
    layers = ["frontend", "backend", "backend", "data", "ops", "frontend"]
    app_list = [
        AppStatus(name=names[i % 6], version=f"1.{i}.0",
                  phase="failed" if state == "failed" and i == 0 else "running",
                  health="unhealthy" if state in ("failed", "degraded") and i == 0
                  else "healthy",
                  message="health check failed: connection refused"
                  if state in ("failed", "degraded") and i == 0 else "",
                  layer=layers[i % 6], restarts=i, uptime_s=3600.0 + i * 17,
                  cpu_percent=1.5 * (i + 1), rss_bytes=(20 + 7 * i) * 1024 * 1024)
        for i in range(apps)
    ]
    return NodeStatus(
        node=node, labels=labels or {}, revision=revision, status=state,
        message=fields.pop("message", "all apps running and healthy" if state == "synced"
                           else f"{state}: web"),
        apps=app_list, updated_at=iso_time(now), agent_version="0.1.0",
        last_reconcile_at=iso_time(now), last_reconcile_ms=850.0, **fields,
    )


def reconcile_events(node: str, revision: str, now: datetime, duration_ms: float = 900.0,
                     ok: bool = True) -> list[Event]:
    """fetched -> started -> finished, the events a reconcile emits."""
    return [
        make_event("source.fetched", node, now, revision=revision),
        make_event("reconcile.started", node, now, revision=revision),
        make_event("reconcile.finished", node, now, revision=revision,
                   outcome="success" if ok else "failure", duration_ms=duration_ms,
                   message=None if ok else "web: health check failed"),
    ]


async def connect(url: str) -> tuple[NATS, JetStreamContext, KeyValue]:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    return nc, js, await ensure(js)
