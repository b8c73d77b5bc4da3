"""The node's NATS endpoints: the `gitops-node` micro service and the fleet/push triggers.

Each request is parsed by reconciler.bus_wire (bad bodies -> micro error 400) and served by
the agent through AgentAPI; nothing here blocks on a reconcile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from reconciler import __version__
from reconciler.agent_api import AgentAPI
from reconciler.bus_wire import (
    BadRequest,
    SourceChanged,
    parse_app_body,
    parse_body,
    parse_fleet_request,
    parse_source_changed,
    source_matches,
)
from reconciler.status import NodeStatus
from reconciler.subjects import FLEET_RECONCILE, RPC_SERVICE, SOURCE_CHANGED, rpc_subject

log = logging.getLogger("reconciler.bus")


class NodeEndpoints:
    """RPC endpoints gitops.rpc.<node>.* and the fleet/source-changed subscriptions."""

    def __init__(self, agent: AgentAPI, snapshot: Callable[[], NodeStatus]) -> None:
        self.agent = agent
        self.node = agent.node_id
        self._snapshot = snapshot
        self._service: Service | None = None
        self._subs: list[Subscription] = []

    async def stop(self) -> None:
        service, self._service = self._service, None
        subs, self._subs = self._subs, []
        with contextlib.suppress(Exception):
            if service is not None:
                await service.stop()
            for sub in subs:
                await sub.unsubscribe()

    async def start(self, nc: NATS) -> None:
        service = await add_service(
            nc,
            name=RPC_SERVICE,
            version=__version__,
            description="gitops-mesh node agent",
            metadata={"node": self.node},
        )
        handlers: dict[str, Callable[[bytes], Awaitable[Any]]] = {
            "status": self._rpc_status,
            "state": self._rpc_state,
            "plan": self._rpc_plan,
            "reconcile": self._rpc_reconcile,
            "health": self._rpc_health,
            "suspend": self._rpc_suspend,
            "resume": self._rpc_resume,
        }
        self._service = service
        for endpoint, fn in handlers.items():
            await service.add_endpoint(
                name=endpoint, subject=rpc_subject(self.node, endpoint), handler=_rpc(fn)
            )
        self._subs.append(await nc.subscribe(FLEET_RECONCILE, cb=self._on_fleet_reconcile))
        self._subs.append(await nc.subscribe(SOURCE_CHANGED, cb=self._on_source_changed))
        await nc.flush()

    def _known_apps(self) -> list[str]:
        return [a.name for a in self.agent.status().apps]

    async def _rpc_status(self, data: bytes) -> Any:
        parse_body(data)
        return self._snapshot().model_dump(mode="json")

    async def _rpc_state(self, data: bytes) -> Any:
        parse_body(data)
        return self.agent.state()

    async def _rpc_plan(self, data: bytes) -> Any:
        parse_body(data)
        return (await self.agent.plan()).to_json()

    async def _rpc_reconcile(self, data: bytes) -> Any:
        body = parse_body(data, allowed=("reason",))
        reason = body.get("reason", "rpc")
        if not isinstance(reason, str):
            raise BadRequest("'reason' must be a string")
        return {"node": self.node, "run_id": self.agent.trigger(reason or "rpc")}

    async def _rpc_health(self, data: bytes) -> Any:
        app = parse_app_body(data, self._known_apps())
        return {"node": self.node, "health": await self.agent.check_health(app)}

    async def _rpc_suspend(self, data: bytes) -> Any:
        app = parse_app_body(data, self._known_apps())
        await self.agent.suspend(app)
        return {"node": self.node, "app": app, "suspended": True}

    async def _rpc_resume(self, data: bytes) -> Any:
        app = parse_app_body(data, self._known_apps())
        await self.agent.resume(app)
        return {"node": self.node, "app": app, "suspended": False}

    async def _on_fleet_reconcile(self, msg: Msg) -> None:
        try:
            selector = parse_fleet_request(msg.data)
        except BadRequest as exc:
            log.warning("ignoring %s request: %s", FLEET_RECONCILE, exc)
            return
        if selector is not None and not selector.matches(self.agent.labels):
            return  # not for us: stay silent so the caller counts only matching nodes
        run_id = self.agent.trigger("fleet")
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(json.dumps({"node": self.node, "run_id": run_id}).encode())

    async def _on_source_changed(self, msg: Msg) -> None:
        try:
            change = parse_source_changed(msg.data)
        except BadRequest as exc:
            log.warning("ignoring %s message: %s", SOURCE_CHANGED, exc)
            return
        local = SourceChanged(_local_path(change.repo), change.branch, change.revision)
        if source_matches(local, _local_path(self.agent.repo_url), self.agent.branch):
            log.info("push to %s at %s: reconciling now", change.branch, change.revision[:12])
            self.agent.trigger(f"source.changed {change.revision[:12]}")


def _rpc(fn: Callable[[bytes], Awaitable[Any]]) -> Callable[[Request], Awaitable[None]]:
    """A micro handler: JSON out, BadRequest -> 400, anything else -> 500 (never a crash)."""

    async def handler(req: Request) -> None:
        try:
            result = await fn(req.data)
        except BadRequest as exc:
            await req.respond_error("400", str(exc))
            return
        except Exception as exc:
            log.exception("RPC %s failed", req.subject)
            await req.respond_error("500", f"{type(exc).__name__}: {exc}")
            return
        await req.respond(json.dumps(result).encode())

    return handler


def _local_path(url: str) -> str:
    """Local repo paths compared by their real location (a hook reports its own cwd)."""
    if "://" not in url and os.path.exists(url):
        return os.path.realpath(url)
    if url.startswith("file://") and os.path.exists(url[7:]):
        return os.path.realpath(url[7:])
    return url
