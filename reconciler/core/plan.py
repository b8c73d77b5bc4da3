"""Planner: desired state x current state -> an ordered Plan of actions. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from reconciler.core.graph import DependencyGraph
from reconciler.core.spec import AppSpec
from reconciler.core.state import CurrentApp, CurrentState, DesiredState
from reconciler.core.states import BUSY_PHASES, EventType


class ActionKind(StrEnum):
    """What changes for the app (what `plan` shows and the event says)."""

    DEPLOY = "deploy"
    UPGRADE = "upgrade"
    RECONFIGURE = "reconfigure"
    RESTART = "restart"
    REMOVE = "remove"


class Mode(StrEnum):
    """How the executor carries an action out; the planner picks it from CurrentApp's facts
    and the executor runs exactly the step it names (Executor.apply)."""

    # nothing is installed: install and start this spec, recorded as app.deployed (a first
    # deploy, or a retry of one that never got installed)
    INSTALL = "install"
    # an older spec is installed but no process of it is alive: install and start this spec
    # afresh, with nothing to hand over from or roll back to
    REINSTALL = "reinstall"
    # the installed version is alive: install beside it, stop it, start this spec, roll
    # back to it if this spec does not come up healthy
    REPLACE = "replace"
    # this very spec is installed: stop what is left of it and start it again
    RESTART = "restart"
    # stop the app and delete its files and record
    REMOVE = "remove"


# How each kind is done unless the app is found half there (dead, or never installed):
# the mode `plan` leaves unsaid.
USUAL_MODES: dict[ActionKind, Mode] = {
    ActionKind.DEPLOY: Mode.INSTALL,
    ActionKind.UPGRADE: Mode.REPLACE,
    ActionKind.RECONFIGURE: Mode.REPLACE,
    ActionKind.RESTART: Mode.RESTART,
    ActionKind.REMOVE: Mode.REMOVE,
}
_SUCCESS_EVENTS: dict[ActionKind, EventType] = {
    ActionKind.DEPLOY: "app.deployed",
    ActionKind.UPGRADE: "app.upgraded",
    ActionKind.RECONFIGURE: "app.reconfigured",
    ActionKind.RESTART: "app.restarted",
    ActionKind.REMOVE: "app.removed",
}


@dataclass(frozen=True)
class Action:
    """One step. `generation` orders non-removal steps (same generation may run in parallel);
    removals carry their own reverse-dependency generation. `mode` is how it is done."""

    kind: ActionKind
    app: str
    generation: int
    reason: str
    from_version: str | None = None
    to_version: str | None = None
    depends_on: tuple[str, ...] = ()
    mode: Mode = field(kw_only=True)

    @property
    def event(self) -> EventType:
        """The event the executor records when this action succeeds."""
        return "app.deployed" if self.mode is Mode.INSTALL else _SUCCESS_EVENTS[self.kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "app": self.app,
            "generation": self.generation,
            "reason": self.reason,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "depends_on": list(self.depends_on),
            "mode": self.mode.value,
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
    # Installed apps whose process stays as it is but whose metadata (labels, layer,
    # description, nodes, depends_on) changed: the executor stores their new spec, no restart.
    metadata_only: tuple[str, ...] = ()

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
            "metadata_only": list(self.metadata_only),
        }


# ---------------------------------------------------------------------------------------
# The planner

HELD_SPEC_ERRORS = "spec errors at this revision; removals held"
HELD_FAILED = "failed at this spec; change the spec or ask an operator"


@dataclass(frozen=True)
class _Hold:
    """A held app, as its dependents see it."""

    reason: str
    running: bool  # it keeps running while held
    stale: bool  # what runs (if anything) is older than this revision asks for


def make_plan(desired: DesiredState, current: CurrentState) -> Plan:
    """Desired x current -> the ordered actions of one reconcile. Pure.

    Removals come first, dependents before their dependencies (by the installed apps'
    recorded depends_on), then everything else by generation of the desired graph.

    Held (never touched): suspended apps, apps with an invalid spec, an app that failed at
    exactly the desired spec (until the spec changes or an operator clears it), and every
    removal while the tree has any spec problem. A held dependency holds its dependents:
    - held and not running (never installed, failed, suspended while down): every action of
      its dependents is held, restarts included, since they could not start;
    - held but running an older spec (invalid now, rolled back after failing, or itself
      waiting on a dependency): deploys, upgrades and reconfigures of its dependents are
      held, since they may need the spec that was not applied; restarting a crashed
      dependent at its current spec stays safe;
    - suspended and running: nothing is held; suspension freezes that app, not the stack.
    Apps with nothing to do stay unchanged whatever their dependencies do. An installed app
    whose process spec is unchanged but whose metadata (METADATA_FIELDS) changed is listed in
    metadata_only (too when it restarts for drift): the executor stores its new spec, no restart.
    An installed app that is held keeps what it depends on: those removals are held too.
    Each action's Mode says how the executor does it (from CurrentApp.installed and .alive),
    so this plan is all the executor decides from.
    """
    held: dict[str, str] = {}
    changes: list[Action] = []
    unchanged: list[str] = []
    metadata_only: list[str] = []

    holds: dict[str, _Hold | None] = {}
    for name in desired.invalid:
        kept = current.apps.get(name)
        why = (
            "spec invalid at this revision; not deployed" if kept is None
            else f"spec invalid at this revision; kept at {kept.version} as it is"
        )
        held[name] = why
        holds[name] = _Hold(why, _is_up(kept), stale=True)

    graph = DependencyGraph.from_apps(desired.apps)
    for generation, names in enumerate(graph.generations()):
        for name in names:
            if name in desired.invalid:
                continue  # a hand-made DesiredState may list it in both
            spec = desired.apps[name]
            cur = current.apps.get(name)
            kind, reason = _decide(spec, cur)
            if kind is None and reason is not None:
                held[name] = reason
                holds[name] = _Hold(reason, _is_up(cur), stale=reason == HELD_FAILED)
                continue
            if _metadata_changed(spec, cur) and kind in (None, ActionKind.RESTART):
                # the process is (or restarts) at this spec either way: store the new
                # metadata now; a held dependency does not hold a relabel
                metadata_only.append(name)
            blocker = None if kind is None else _blocked_by(spec.depends_on, holds, kind)
            if blocker is not None:
                held[name] = blocker
                holds[name] = _Hold(blocker, _is_up(cur), stale=True)
            elif kind is None:
                unchanged.append(name)
                holds[name] = None
            else:
                changes.append(
                    Action(
                        kind, name, generation, reason or "",
                        from_version=cur.version if cur else None, to_version=spec.version,
                        depends_on=tuple(spec.depends_on), mode=_mode(kind, cur),
                    )
                )
                holds[name] = None

    removals = _removals(desired, current, held)
    return Plan(
        revision=desired.revision,
        actions=(*removals, *changes),
        held=tuple(HeldApp(name, held[name]) for name in sorted(held)),
        unchanged=tuple(sorted(unchanged)),
        metadata_only=tuple(sorted(metadata_only)),
    )


def _removals(desired: DesiredState, current: CurrentState, held: dict[str, str]) -> list[Action]:
    """Remove actions for installed apps no longer desired, dependents first; records the
    removals it holds in `held` (spec errors, suspension, still needed by a held app)."""
    to_remove: set[str] = set()
    for name, installed_app in current.apps.items():
        if name in desired.apps or name in desired.invalid:
            continue
        if desired.problems:
            held[name] = HELD_SPEC_ERRORS
        elif installed_app.suspended:
            held[name] = "suspended by an operator; not removed until resumed"
        else:
            to_remove.add(name)
    # An installed app left as it is (held) keeps what it depends on, transitively.
    kept = [name for name in held if name in current.apps]
    while kept:
        user = kept.pop()
        for dep in current.apps[user].depends_on:
            if dep in to_remove:
                to_remove.discard(dep)
                held[dep] = f"still needed by {user}, which is held"
                kept.append(dep)
    if not to_remove:
        return []
    installed = DependencyGraph.from_edges(
        {name: cur.depends_on for name, cur in current.apps.items()}
    )
    return [
        Action(
            ActionKind.REMOVE, name, generation, "no longer desired on this node",
            from_version=current.apps[name].version,
            depends_on=tuple(current.apps[name].depends_on), mode=Mode.REMOVE,
        )
        for generation, names in enumerate(installed.removal_order(to_remove))
        for name in names
    ]


def _metadata_changed(spec: AppSpec, cur: CurrentApp | None) -> bool:
    """The installed app runs this very process spec but its stored metadata differs."""
    return (
        cur is not None and cur.metadata_hash is not None
        and cur.version == spec.version and cur.spec_hash == spec.spec_hash()
        and cur.metadata_hash != spec.metadata_hash()
    )


def _is_up(cur: CurrentApp | None) -> bool:
    return cur is not None and cur.running and cur.phase != "failed"


def _decide(spec: AppSpec, cur: CurrentApp | None) -> tuple[ActionKind | None, str | None]:
    """(action, reason); (None, reason) holds the app, (None, None) leaves it unchanged."""
    if spec.suspend:
        return None, "suspended in the spec" + ("" if cur else "; not deployed")
    if cur is not None and cur.suspended:
        return None, "suspended by an operator"
    if cur is None:
        return ActionKind.DEPLOY, "new app"
    spec_hash = spec.spec_hash()
    if cur.failed_spec_hash is not None and cur.failed_spec_hash == spec_hash:
        return None, HELD_FAILED
    if cur.version != spec.version:
        return ActionKind.UPGRADE, f"version {cur.version} -> {spec.version}"
    if cur.spec_hash != spec_hash:
        return ActionKind.RECONFIGURE, "spec changed"
    if cur.phase == "failed":
        return ActionKind.RESTART, "failed; starting again"
    if cur.phase == "blocked":
        return ActionKind.RESTART, "was blocked by a dependency; starting again"
    if cur.phase in BUSY_PHASES:
        # An agent stopped mid-action: starting again is how the action gets finished.
        return ActionKind.RESTART, f"interrupted while {cur.phase}; starting again"
    if not cur.running:
        return ActionKind.RESTART, "not running (drift)"
    return None, None


def _mode(kind: ActionKind, cur: CurrentApp | None) -> Mode:
    """How a deploy, upgrade, reconfigure or restart is done, from what is installed and
    alive (see Mode)."""
    if cur is None or not cur.installed:
        return Mode.INSTALL
    if kind is ActionKind.RESTART:
        return Mode.RESTART
    return Mode.REPLACE if cur.alive else Mode.REINSTALL


def _blocked_by(deps: list[str], holds: dict[str, _Hold | None], kind: ActionKind) -> str | None:
    """Why an app's action must wait for a held dependency (rules in make_plan), else None."""
    for dep in deps:
        if dep not in holds:
            # desired_for_node never produces this, a hand-made DesiredState might.
            return f"dependency {dep} is not desired on this node"
        hold = holds[dep]
        if hold is None:
            continue
        if not hold.running:
            return f"waiting for dependency {dep}: {hold.reason}"
        if hold.stale and kind is not ActionKind.RESTART:
            return f"dependency {dep} is held: {hold.reason}"
    return None
