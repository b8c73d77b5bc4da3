"""Event model (the wire shape of `gitops.events.<node>.<type>`). Pure: clock and ids injected."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from reconciler.core.states import EVENT_TYPES, EventType, Outcome

# The event wire format's version. Adding an optional field keeps it; removing or renaming a
# field, or changing a field's meaning or type, bumps it (docs/nats.md, "Event schema").
EVENT_SCHEMA_VERSION = 1


class Event(BaseModel):
    """One thing that happened on a node. Never carries env values or other secrets."""

    # `schema` on the wire; the attribute is `schema_version` (BaseModel has a `schema()`).
    # Unknown fields are ignored, not refused: a newer agent may add optional fields within
    # the same schema version, and consumers of that version must keep reading its events.
    model_config = ConfigDict(extra="ignore", frozen=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)

    # Absent in events of agents older than the field: they are version 1 too.
    schema_version: int = Field(EVENT_SCHEMA_VERSION, alias="schema", ge=1)
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
    type: EventType, node: str, now: datetime, *, event_id: str | None = None, **fields: Any
) -> Event:
    """Build an event; `fields` are the optional contract fields (app, version, outcome, ...)."""
    return Event(
        id=event_id or new_event_id(), type=type, node=node, time=iso_time(now), **fields
    )


def event_json_schema() -> dict[str, Any]:
    """The JSON Schema of an event as published (`gitops-mesh schema --events`)."""
    schema = Event.model_json_schema(by_alias=True, mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"gitops-mesh event (schema {EVENT_SCHEMA_VERSION})"
    schema["description"] = (
        "One event of gitops.events.<node>.<type>. `schema` is the format version: optional "
        "fields may be added within a version; removing or renaming a field bumps it. "
        "Events without `schema` come from agents older than the field (version 1).")
    schema["properties"]["type"]["examples"] = list(EVENT_TYPES)
    return schema
