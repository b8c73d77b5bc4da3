"""Simulated fleet traffic for tests, benchmarks and screenshots: writes status and events
into NATS exactly the way agents do (KV put of NodeStatus JSON, JetStream publish of Event
JSON on gitops.events.<node>.<type> with Nats-Msg-Id)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from console.feed import Connector
from reconciler.core.events import Event, iso_time, make_event
from reconciler.core.status import AppStatus, NodeStatus
from reconciler.mesh import provision, subjects


async def ensure(js: JetStreamContext) -> KeyValue:
    """The events stream and the status bucket (created like agents create them)."""
    await provision.ensure(js, provision.events_stream())
    await provision.ensure(js, provision.nodes_bucket())
    return await js.key_value(subjects.KV_BUCKET)


def connector_for(url: str) -> Connector:
    """The console's NATS connector for a plain URL (what `--nats URL` gives)."""
    import argparse

    from console.cli import nats_connector

    return nats_connector(argparse.Namespace(nats=url))


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
    """fetched -> started -> finished, the events a reconcile emits (one trace, as agents
    record every reconcile in an OpenTelemetry span)."""
    trace = uuid.uuid4().hex
    return [
        make_event("source.fetched", node, now, revision=revision, trace_id=trace),
        make_event("reconcile.started", node, now, revision=revision, trace_id=trace),
        make_event("reconcile.finished", node, now, revision=revision,
                   outcome="success" if ok else "failure", duration_ms=duration_ms,
                   message=None if ok else "web: health check failed", trace_id=trace),
    ]


async def connect(url: str) -> tuple[NATS, JetStreamContext, KeyValue]:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    return nc, js, await ensure(js)


def web_spec(version: str, env_keys: tuple[str, ...] = ("TOKEN",)) -> dict[str, Any]:
    """A redacted spec of app `web` as a node's `state` RPC returns it (env values ***)."""
    return {"name": "web", "version": version, "description": "the web front end",
            "layer": "frontend", "depends_on": ["api"],
            "run": {"command": ["web", "--port", "8080"], "env": dict.fromkeys(env_keys, "***")},
            "health": {"http": {"url": "http://127.0.0.1:8080/healthz"}}}


class FakeNode:
    """A tiny real RPC responder for one node: the `gitops-node` micro service endpoints
    (reconcile, health, suspend, resume, state, logs) and the fleet trigger. `reconcile`
    publishes the reconcile.started event an agent would publish. Requests are recorded in
    `calls`. `state` says it runs web 1.0 and its checkout wants web 2.0; `logs` serves
    `log_lines`, then the lines appended after the cursor it handed out."""

    def __init__(self, nc: NATS, node: str, labels: dict[str, str] | None = None) -> None:
        self.nc = nc
        self.node = node
        self.labels = labels or {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.runs = 0
        self._service: Any = None
        self._fleet_sub: Any = None
        self.log_lines: list[str] = [f"web line {i}" for i in range(1, 301)]

    async def start(self) -> FakeNode:
        import json

        from nats import micro

        self._service = await micro.add_service(self.nc, name=subjects.RPC_SERVICE,
                                                version="0.0.0")

        def handler(endpoint: str) -> Any:
            async def handle(req: Any) -> None:
                body = json.loads(req.data) if req.data else {}
                self.calls.append((endpoint, body))
                app = body.get("app")
                if app == "crash":  # how a node's internal failure looks
                    await req.respond_error("500", "internal error: boom")
                    return
                if app is not None and app != "web":
                    await req.respond_error("400", f"unknown app {app!r}; this node has: web")
                    return
                if endpoint == "reconcile":
                    await req.respond(json.dumps(await self._reconcile()).encode())
                elif endpoint == "health":
                    await req.respond(json.dumps({"web": "healthy"}).encode())
                elif endpoint == "state":
                    await req.respond(json.dumps(self.state()).encode())
                elif endpoint == "logs":
                    await req.respond(json.dumps(self.logs(body)).encode())
                else:
                    await req.respond(json.dumps({"node": self.node, endpoint: True}).encode())
            return handle

        for endpoint in ("reconcile", "health", "suspend", "resume", "state", "logs"):
            await self._service.add_endpoint(
                name=endpoint, subject=subjects.rpc_subject(self.node, endpoint),
                handler=handler(endpoint))

        async def on_fleet(msg: Any) -> None:
            body = json.loads(msg.data) if msg.data else {}
            match = (body.get("selector") or {}).get("match", {})
            if all(self.labels.get(k) == v for k, v in match.items()):
                self.calls.append(("fleet", body))
                await msg.respond(json.dumps(await self._reconcile()).encode())

        self._fleet_sub = await self.nc.subscribe(subjects.FLEET_RECONCILE, cb=on_fleet)
        await self.nc.flush()
        return self

    def state(self) -> dict[str, Any]:
        return {"node": self.node,
                "desired": {"revision": "d" * 40, "apps": {"web": web_spec("2.0")},
                            "invalid": [], "problems": []},
                "current": {"web": {"version": "1.0", "phase": "running", "health": "healthy",
                                    "applied_revision": "c" * 40, "spec": web_spec("1.0", ())}}}

    def logs(self, body: dict[str, Any]) -> dict[str, Any]:
        lines = max(1, min(int(body.get("lines", 100)), 500))
        start = int(body["cursor"]) if body.get("cursor") else max(0, len(self.log_lines) - lines)
        chunk = self.log_lines[start:start + lines]
        return {"node": self.node, "app": "web", "lines": chunk, "cursor": str(start + len(chunk)),
                "more": False, "truncated": start > 0 and not body.get("cursor")}

    async def _reconcile(self) -> dict[str, str]:
        self.runs += 1
        run_id = f"{self.node}-run-{self.runs}"
        event = make_event("reconcile.started", self.node, datetime.now(UTC), run_id=run_id,
                           message="requested from the console", trace_id=uuid.uuid4().hex)
        await publish_event(self.nc.jetstream(), event)
        return {"node": self.node, "run_id": run_id}

    async def stop(self) -> None:
        if self._fleet_sub is not None:
            await self._fleet_sub.unsubscribe()
        if self._service is not None:
            await self._service.stop()


class ConsoleThread:
    """Runs a console (uvicorn) in a background thread on a free port; for tests and demos."""

    def __init__(self, config: Any, connect: Any, port: int, **app_kwargs: Any) -> None:
        from console.cli import make_server

        self.port = port
        self.server = make_server(config, connect, port, **app_kwargs)
        self.thread: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def app(self) -> Any:
        return self.server.config.app

    def start(self, timeout: float = 10.0) -> ConsoleThread:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, name="console", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the console did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        import signal

        self.server.handle_exit(signal.SIGTERM, None)  # what a Ctrl-C does
        if self.thread is not None:
            self.thread.join(10)


class HealthResponder:
    """Answers `gitops.rpc.<node>.health` for many simulated nodes with one subscription:
    {"web": "healthy"}, or "unhealthy" for the nodes in `unhealthy`. Asked nodes: `asked`."""

    def __init__(self, nc: NATS, nodes: set[str], unhealthy: frozenset[str] = frozenset()
                 ) -> None:
        self.nc = nc
        self.nodes = nodes
        self.unhealthy = set(unhealthy)
        self.asked: list[str] = []
        self._sub: Any = None

    async def start(self) -> HealthResponder:
        import json

        async def on_request(msg: Any) -> None:
            node = msg.subject.split(".")[2]
            if node not in self.nodes:
                return
            self.asked.append(node)
            health = "unhealthy" if node in self.unhealthy else "healthy"
            await msg.respond(json.dumps({"web": health}).encode())

        self._sub = await self.nc.subscribe(subjects.rpc_subject("*", "health"), cb=on_request)
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
