"""Desired and current state: the two values the planner compares. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from reconciler.errors import SpecProblem
from reconciler.spec import AppSpec

Phase = Literal[
    "pending", "deploying", "upgrading", "running", "rolling-back", "removing", "failed", "blocked"
]
Health = Literal["healthy", "unhealthy", "unknown"]
PHASES: tuple[str, ...] = (
    "pending", "deploying", "upgrading", "running", "rolling-back", "removing", "failed", "blocked",
)
HEALTHS: tuple[str, ...] = ("healthy", "unhealthy", "unknown")


@dataclass(frozen=True)
class DesiredState:
    """What the spec repo at `revision` asks of this node.

    `apps` holds the valid apps targeted at the node. `invalid` names apps whose documents
    failed validation: the planner neither changes nor removes them (a bad push never takes a
    running app down). `problems` are the located errors behind that.
    """

    revision: str
    apps: dict[str, AppSpec]
    invalid: frozenset[str] = frozenset()
    problems: tuple[SpecProblem, ...] = ()


@dataclass(frozen=True)
class CurrentApp:
    """What runs (or is installed) for one app on this node."""

    name: str
    version: str
    spec_hash: str
    phase: Phase = "running"
    health: Health = "unknown"
    running: bool = True
    depends_on: tuple[str, ...] = ()
    suspended: bool = False
    # A (version, spec_hash) that failed and was rolled back: not retried until the spec
    # changes or an operator asks (see plan.make_plan).
    failed_spec_hash: str | None = None
    # AppSpec.metadata_hash of the stored spec; None: unknown, metadata changes not detected
    metadata_hash: str | None = None


@dataclass(frozen=True)
class CurrentState:
    apps: dict[str, CurrentApp] = field(default_factory=dict)
