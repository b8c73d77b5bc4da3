"""The seams between the agent and the mesh: what RPC/KV need from an agent, and the outbox.

The agent (reconciler.node.agent) implements AgentAPI; the store (reconciler.node.store) implements
Outbox; the mesh (reconciler.mesh.link) consumes both and never reaches further into the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from reconciler.core.plan import Plan
from reconciler.core.status import NodeStatus


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    event_id: str
    subject: str
    payload: bytes  # the event JSON, exactly as published


class Outbox(Protocol):
    def outbox_batch(self, limit: int, after: int = 0) -> list[OutboxEntry]:
        """Oldest first (those with seq > `after`: the publisher skips what is in flight);
        entries stay until acked."""

    def outbox_ack(self, seqs: list[int]) -> None:
        """Delete entries JetStream has acknowledged."""

    def outbox_stats(self) -> tuple[int, int]:
        """(backlog, dropped since the store was created)."""


class AgentAPI(Protocol):
    node_id: str
    labels: dict[str, str]
    repo_url: str
    branch: str

    def status(self) -> NodeStatus: ...

    def state(self) -> dict[str, Any]:
        """{"desired": {...}, "current": {...}} as JSON-ready values (no env values)."""

    async def plan(self) -> Plan:
        """What a reconcile would do now (fetches the source, changes nothing)."""

    def trigger(self, reason: str) -> str:
        """Ask for a reconcile now; returns a run id at once. Coalesces while one runs."""

    async def check_health(self, app: str | None = None) -> dict[str, str]:
        """Probe now; app name -> health."""

    async def suspend(self, app: str | None = None) -> None:
        """Suspend the whole node (None) or one app."""

    async def resume(self, app: str | None = None) -> None: ...

    async def logs(self, app: str, lines: int, cursor: str | None = None) -> dict[str, Any]:
        """The app's last `lines` lines, or those written after `cursor`, bounded:
        {"node", "app", "lines": [...], "cursor", "more", "truncated"}."""

    def add_listener(self, on_change: Callable[[], None]) -> None:
        """`on_change` runs (on the loop) after every status change and every new event."""
