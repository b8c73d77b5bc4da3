"""Planner: desired state x current state -> an ordered Plan of actions. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ActionKind(StrEnum):
    DEPLOY = "deploy"
    UPGRADE = "upgrade"
    RECONFIGURE = "reconfigure"
    RESTART = "restart"
    REMOVE = "remove"


@dataclass(frozen=True)
class Action:
    """One step. `generation` orders non-removal steps (same generation may run in parallel);
    removals carry their own reverse-dependency generation."""

    kind: ActionKind
    app: str
    generation: int
    reason: str
    from_version: str | None = None
    to_version: str | None = None
    depends_on: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "app": self.app,
            "generation": self.generation,
            "reason": self.reason,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "depends_on": list(self.depends_on),
        }


@dataclass(frozen=True)
class HeldApp:
    """An app the plan deliberately leaves alone, and why (suspended, invalid spec, ...)."""

    app: str
    reason: str


@dataclass(frozen=True)
class Plan:
    revision: str
    actions: tuple[Action, ...] = ()
    held: tuple[HeldApp, ...] = ()
    unchanged: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not self.actions

    def removals(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.kind is ActionKind.REMOVE)

    def generations(self) -> list[list[Action]]:
        """Non-removal actions grouped by generation, in order."""
        groups: dict[int, list[Action]] = {}
        for action in self.actions:
            if action.kind is not ActionKind.REMOVE:
                groups.setdefault(action.generation, []).append(action)
        return [groups[g] for g in sorted(groups)]

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "actions": [a.to_json() for a in self.actions],
            "held": [{"app": h.app, "reason": h.reason} for h in self.held],
            "unchanged": list(self.unchanged),
        }
