"""App changes: the executor's record writes, each with its event, and the shared end states."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from reconciler.core.events import Event
from reconciler.core.spec import AppSpec
from reconciler.core.states import EventType, Outcome
from reconciler.node.store import AppRecord, Store
from reconciler.node.transitions import transition

# A new version (or spec) that came up healthy: it is what runs now, and no failure is left.
RUNNING: dict[str, Any] = dict(
    phase="running", health="healthy", message="", failed_spec_hash=None, failed_version=None,
    upgrade_intent=None,
)


class EventRecorder(Protocol):
    """The agent's event queue, as the executor's hooks provide it."""

    def record(self, type: EventType, **fields: Any) -> Event:
        """Queue an event in the store (inside the caller's transaction)."""


class AppChanges:
    """transitions.transition bound to the executor's store and event recorder, and the
    failed end state that deploys, restarts and rollbacks all come to."""

    def __init__(self, store: Store, events: EventRecorder) -> None:
        self.store = store
        self.events = events

    def transition(self, name: str, change: Mapping[str, Any] | AppRecord | None,
                   event: EventType | None = None, **fields: Any) -> None:
        transition(self.store, self.events.record, name, change, event, **fields)

    def failed(self, spec: AppSpec, message: str, permanent: bool,
               started: float) -> tuple[Outcome, str]:
        """The app did not come up with `spec`: failed, and (when `permanent`) not retried."""
        self.transition(
            spec.name,
            dict(phase="failed", health="unknown", message=message, upgrade_intent=None,
                 failed_spec_hash=spec.spec_hash() if permanent else None),
            "app.failed", version=spec.version, outcome="failure", duration_ms=ms_since(started),
            message=message,
        )
        return "failure", message


def ms_since(started: float) -> float:
    """Milliseconds since the time.monotonic() reading `started`, to 0.1 ms."""
    return round((time.monotonic() - started) * 1000, 1)
