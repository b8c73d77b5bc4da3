"""Typed states and their named groups: app phase and health, node status, outcome, event type."""

from __future__ import annotations

from typing import Literal, get_args

# -- apps -------------------------------------------------------------------------------
Phase = Literal[
    "pending", "deploying", "upgrading", "running", "rolling-back", "removing", "failed", "blocked"
]
Health = Literal["healthy", "unhealthy", "unknown"]

# An action is under way (or was, when an agent stopped in the middle of it): the node is
# progressing, and a planner that finds one left behind starts the app again to finish it.
BUSY_PHASES: frozenset[Phase] = frozenset(
    {"pending", "deploying", "upgrading", "rolling-back", "removing"}
)
# The app needs a new spec, a dependency, or an operator: the node reports failed.
STUCK_PHASES: frozenset[Phase] = frozenset({"failed", "blocked"})

# -- nodes ------------------------------------------------------------------------------
NodeState = Literal["synced", "progressing", "degraded", "failed", "suspended"]
NODE_STATES: tuple[NodeState, ...] = get_args(NodeState)

# -- actions and events -----------------------------------------------------------------
Outcome = Literal["success", "failure", "skipped"]

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
    "node.reconfigured",
    "rollout.wave-opened",
    "rollout.completed",
    "rollout.aborted",
    "rollout.paused",
    "rollout.resumed",
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]
