"""The console's NATS requests: node RPCs as HTTP answers, JetStream domain, audit events."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from console.state import Console
from console.tokens import Actor
from reconciler.core.events import Event, iso_time, new_event_id
from reconciler.mesh.client import RpcError, call
from reconciler.mesh.conn import NatsOptions

log = logging.getLogger("gitops_mesh.console")
AUDIT_NODE = "console"       # audit events: gitops.events.console.action.<action>


@dataclass
class RpcReply:
    """HTTP-ready outcome of a node RPC: status code and JSON body."""

    status: int
    body: dict[str, Any]


async def rpc(nc: Any, node: str, endpoint: str, payload: dict[str, Any], timeout: float
              ) -> RpcReply:
    """One node RPC (reconciler.mesh.client.call) as an HTTP answer; failures are values:
    the node's own 4xx pass through, silence is 503/504, its failures a 502."""
    try:
        answer = await call(nc, node, endpoint, payload, timeout)
    except RpcError as exc:
        code = int(exc.code) if exc.code and exc.code.isdigit() else None
        return RpcReply(exc.status, {"error": exc.detail, "code": code})
    return RpcReply(200, answer if isinstance(answer, dict) else {"result": answer})


def connected_nats(console: Console) -> Any:
    """The feed's NATS connection while it is connected, else None."""
    feed = console.feed
    return feed.nc if feed is not None and feed.connected else None


def nats_options(console: Console) -> NatsOptions:
    """Options naming the feed's JetStream domain (the local JetStream without one)."""
    return NatsOptions(js_domain=console.feed.js_domain if console.feed else None)


async def audit(console: Console, actor: Actor | None, action: str, status: int,
                **target: Any) -> None:
    """Publish `gitops.events.console.action.<action>` naming who did what to which target
    and how it went. A lost audit event is logged; the action already happened."""
    nc = connected_nats(console)
    who = actor or Actor("unknown", "viewer")
    target = {k: v for k, v in target.items() if v is not None}
    what = " ".join(f"{k}={v}" for k, v in target.items() if k in ("node", "app", "count"))
    event = Event(
        id=new_event_id(), type=f"action.{action}", node=AUDIT_NODE,
        time=iso_time(console.clock()), app=target.get("app"),
        outcome="success" if status < 400 else "failure",
        message=f"{who.name} ({who.role}): {action} {what} -> {status}".replace("  ", " "),
        data={"actor": who.name, "role": who.role, "action": action, "status": status,
              **target},
    )
    if nc is None:
        log.warning("audit event not published (NATS away): %s", event.message)
        return
    js = nats_options(console).jetstream(nc)
    try:
        await js.publish(event.subject, event.to_json_bytes(),
                         headers={"Nats-Msg-Id": event.id}, timeout=2.0)
    except Exception as exc:  # no stream, no permission, timeout
        log.warning("audit event not published (%r): %s", exc, event.message)

