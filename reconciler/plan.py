"""Planner: desired state x current state -> an ordered Plan of actions. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from reconciler.spec import AppSpec
from reconciler.state import CurrentApp, CurrentState, DesiredState


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
# Phases an interrupted agent can leave behind: the last action never finished.
_UNFINISHED = ("pending", "deploying", "upgrading", "rolling-back", "removing")


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
    """
    from reconciler.graph import DependencyGraph

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
                        depends_on=tuple(spec.depends_on),
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
    from reconciler.graph import DependencyGraph

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
            depends_on=tuple(current.apps[name].depends_on),
        )
        for generation, names in enumerate(installed.removal_order(to_remove))
        for name in names
    ]


# id(spec) -> (spec, hash, metadata hash). Holding the spec keeps its id from being reused
# while cached.
# AppSpecs are frozen and the loader's ParseCache hands the same instances to every
# revision, so a steady-state node hashes each spec once instead of once per reconcile.
_HASHES: dict[int, tuple[AppSpec, str, str]] = {}
_HASHES_MAX = 50_000


def _hashes_of(spec: AppSpec) -> tuple[AppSpec, str, str]:
    hit = _HASHES.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit
    if len(_HASHES) >= _HASHES_MAX:
        _HASHES.clear()
    entry = (spec, spec.spec_hash(), spec.metadata_hash())
    _HASHES[id(spec)] = entry
    return entry


def spec_hash_of(spec: AppSpec) -> str:
    """spec.spec_hash(), memoized per instance (it dominates planning big nodes)."""
    return _hashes_of(spec)[1]


def _metadata_changed(spec: AppSpec, cur: CurrentApp | None) -> bool:
    """The installed app runs this very process spec but its stored metadata differs."""
    return (
        cur is not None and cur.metadata_hash is not None
        and cur.version == spec.version and cur.spec_hash == spec_hash_of(spec)
        and cur.metadata_hash != _hashes_of(spec)[2]
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
    spec_hash = spec_hash_of(spec)
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
    if cur.phase in _UNFINISHED:
        # An agent stopped mid-action: starting again is how the action gets finished.
        return ActionKind.RESTART, f"interrupted while {cur.phase}; starting again"
    if not cur.running:
        return ActionKind.RESTART, "not running (drift)"
    return None, None


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
