"""Desired and current state: the two values the planner compares. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from reconciler.core.errors import SpecProblem
from reconciler.core.loader import LoadResult
from reconciler.core.spec import AppSpec
from reconciler.core.states import Health, Phase


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
    """What runs (or is installed) for one app on this node: every fact the planner needs
    to say what the executor will do.

    `running`: the app is up as far as drift goes (its process runs or waits in restart
    backoff, a job that finished as its policy allows counts, an app without a process
    counts once installed and running). `alive`: a process of it runs or waits in restart
    backoff, i.e. there is a version to hand over from and roll back to. `installed`: its
    record names an install dir (a blocked or failed first deploy has none).
    """

    name: str
    version: str
    spec_hash: str
    phase: Phase = "running"
    health: Health = "unknown"
    running: bool = True
    alive: bool = True
    installed: bool = True
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


def desired_for_node(
    result: LoadResult, node_id: str, labels: dict[str, str], revision: str
) -> DesiredState:
    """What the spec tree asks of the node with these labels.

    Valid apps whose selector matches go in `apps`. An app whose dependency is not targeted
    at this node (a combination the loader's static check could not rule out) is invalid
    here, with a located problem. `invalid` keeps the tree's invalid apps except those whose
    valid spec shows they do not target this node; the planner holds them."""
    targeted = {
        name: app
        for name, app in result.apps.items()
        if name not in result.invalid and app.targets(labels)
    }
    problems = list(result.problems)
    node_invalid: set[str] = set()
    for name, app in targeted.items():
        for index, dep in enumerate(app.depends_on):
            if dep in targeted or dep in result.invalid:
                continue
            node_invalid.add(name)
            path, line = result.sources.get(name, ("?", 0))
            where = result.locations.get((name, index), (line, 1))
            dep_spec = result.apps.get(dep)
            detail = (
                f"its dependency {dep!r} is not targeted at node {node_id!r} "
                f"({dep_spec.nodes.describe() if dep_spec and dep_spec.nodes else 'missing'})"
            )
            problems.append(
                SpecProblem(path, where[0], where[1], detail, field=f"depends_on[{index}]")
            )
    invalid = {
        name
        for name in result.invalid
        if name not in result.apps or result.apps[name].targets(labels)
    } | node_invalid
    return DesiredState(
        revision=revision,
        apps={n: a for n, a in sorted(targeted.items()) if n not in node_invalid},
        invalid=frozenset(invalid),
        problems=tuple(sorted(problems)),
    )
