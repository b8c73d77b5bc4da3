"""App state transitions: a record change and its event, written in one store transaction."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from reconciler.core.events import Event
from reconciler.core.states import EventType
from reconciler.node.store import AppRecord, Store

# executor.Hooks.record / Agent.record: queues the event inside the caller's transaction
RecordEvent = Callable[..., Event]


def transition(
    store: Store, record: RecordEvent, name: str, change: Mapping[str, Any] | AppRecord | None,
    event: EventType | None = None, **fields: Any,
) -> None:
    """The one way an app's record changes: apply `change` to app `name` and record `event`
    (app=name and `fields`) in one store transaction, so no change goes without its event
    and no event tells of a change that did not happen (like supervisor's change_state).

    `change` is the fields to update, a whole new record, or None to delete the record.
    Without `event` the step is an intermediate phase (deploying, upgrading, rolling-back,
    removing) whose outcome records the event.
    """
    with store.transaction():
        if change is None:
            store.delete_app(name)
        elif isinstance(change, AppRecord):
            store.put_app(change)
        else:
            store.update_app(name, **change)
        if event is not None:
            record(event, app=name, **fields)
