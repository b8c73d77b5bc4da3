"""Filters of the console's views: the event log, the overview's node cards, the Apps page."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from reconciler.core.events import Event
from reconciler.core.states import NODE_STATES
from reconciler.core.status import UNREACHABLE, AppStatus
from reconciler.core.targeting import parse_labels

STATUSES: tuple[str, ...] = (*NODE_STATES, UNREACHABLE)


@dataclass(frozen=True)
class EventFilter:
    """Event log filter; `type` is exact, or a prefix when it ends with `.` or `*`."""

    node: str | None = None
    app: str | None = None
    type: str | None = None

    def matches(self, event: Event) -> bool:
        if self.node and event.node != self.node:
            return False
        if self.app and event.app != self.app:
            return False
        if self.type:
            if self.type.endswith(("*", ".")):
                return event.type.startswith(self.type.rstrip("*"))
            return event.type == self.type
        return True


@dataclass(frozen=True)
class NodeFilter:
    """Overview filter: every given clause must hold. `labels` are k=v pairs."""

    labels: tuple[tuple[str, str], ...] = ()
    layer: str | None = None
    status: str | None = None

    @classmethod
    def parse(cls, labels: Iterable[str] = (), layer: str | None = None,
              status: str | None = None) -> NodeFilter:
        """From query strings like `role=edge`; raises ValueError naming a bad clause."""
        pairs = tuple(parse_labels(labels, what="label filter").items())
        if status and status not in STATUSES:
            raise ValueError(f"status filter {status!r}: expected one of {', '.join(STATUSES)}")
        return cls(pairs, layer or None, status or None)

    def matches(self, card: dict[str, Any]) -> bool:
        if any(card["labels"].get(k) != v for k, v in self.labels):
            return False
        if self.layer and self.layer not in card["layers"]:
            return False
        return not (self.status and card["status"] != self.status)


@dataclass(frozen=True)
class AppFilter:
    """Apps page filter: `name` is a substring; `label` k=v matches the app's own labels or
    the labels of the node running it; `layer` is exact."""

    name: str | None = None
    layer: str | None = None
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, name: str | None = None, layer: str | None = None,
              labels: Iterable[str] = ()) -> AppFilter:
        pairs = tuple(parse_labels(labels, what="label filter").items())
        return cls((name or "").strip() or None, layer or None, pairs)

    def matches(self, app: AppStatus, node_labels: dict[str, str]) -> bool:
        if self.name and self.name.lower() not in app.name.lower():
            return False
        if self.layer and app.layer != self.layer:
            return False
        return all(app.labels.get(k) == v or node_labels.get(k) == v for k, v in self.labels)
