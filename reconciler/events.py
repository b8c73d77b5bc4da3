"""Event model (the wire shape of `gitops.events.<node>.<type>`). Pure: clock and ids injected."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

EventType = Literal[
    "reconcile.started",
    "reconcile.finished",
    "app.deployed",
    "app.upgraded",
    "app.reconfigured",
    "app.restarted",
    "app.removed",
    "app.failed",
    "app.blocked",
    "app.rolled-back",
    "app.health-changed",
    "app.suspended",
    "app.resumed",
    "source.fetched",
    "source.failed",
    "node.started",
    "node.stopping",
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]
Outcome = Literal["success", "failure", "skipped"]


class Event(BaseModel):
    """One thing that happened on a node. Never carries env values or other secrets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    type: str
    node: str
    time: str
    revision: str | None = None
    app: str | None = None
    version: str | None = None
    from_version: str | None = None
    outcome: Outcome | None = None
    duration_ms: float | None = None
    message: str | None = None
    run_id: str | None = None
    trace_id: str | None = None
    data: dict[str, Any] | None = None

    @property
    def subject(self) -> str:
        return f"gitops.events.{self.node}.{self.type}"

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def new_event_id() -> str:
    return uuid.uuid4().hex


def iso_time(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> datetime | None:
    """ISO 8601 (with `Z` or an offset) -> aware datetime; None if absent or unparseable."""
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def make_event(
    type: str, node: str, now: datetime, *, event_id: str | None = None, **fields: Any
) -> Event:
    """Build an event; `fields` are the optional contract fields (app, version, outcome, ...)."""
    return Event(
        id=event_id or new_event_id(), type=type, node=node, time=iso_time(now), **fields
    )
