"""Planner: desired x current -> a whole Plan, for each situation a node meets."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from reconciler.core.errors import SpecProblem
from reconciler.core.loader import SpecFile, load_files
from reconciler.core.plan import (
    HELD_FAILED,
    HELD_SPEC_ERRORS,
    USUAL_MODES,
    Action,
    ActionKind,
    HeldApp,
    Mode,
    Plan,
    make_plan,
)
from reconciler.core.spec import AppSpec
from reconciler.core.state import CurrentApp, CurrentState, DesiredState, desired_for_node

D, U, C, R, X = "deploy", "upgrade", "reconfigure", "restart", "remove"


def app(name: str, version: str = "1.0", deps: tuple[str, ...] = (), **fields: Any) -> AppSpec:
    return AppSpec(name=name, version=version, depends_on=list(deps), **fields)


STACK = [
    app("broker"),
    app("database"),
    app("api", deps=("database", "broker")),
    app("worker", deps=("api", "broker")),
    app("gateway", deps=("api",)),
]


def desired(*specs: AppSpec, invalid: frozenset[str] = frozenset(),
            problems: tuple[SpecProblem, ...] = ()) -> DesiredState:
    return DesiredState("rev2", {s.name: s for s in specs}, invalid, problems)


def installed(spec: AppSpec, **fields: Any) -> CurrentApp:
    """The app as it runs after a successful deploy of `spec`, changed by `fields`."""
    values: dict[str, Any] = {
        "name": spec.name, "version": spec.version, "spec_hash": spec.spec_hash(),
        "phase": "running", "health": "healthy", "running": True,
        "depends_on": tuple(spec.depends_on),
    }
    values.update(fields)
    return CurrentApp(**values)


def current(*apps: CurrentApp) -> CurrentState:
    return CurrentState({a.name: a for a in apps})


def act(kind: str, name: str, gen: int, reason: str, frm: str | None = None,
        to: str | None = "1.0", deps: tuple[str, ...] = (), mode: Mode | None = None) -> Action:
    return Action(ActionKind(kind), name, gen, reason, frm, to, deps,
                  mode=mode or USUAL_MODES[ActionKind(kind)])


def test_fresh_node_deploys_the_stack_in_dependency_order() -> None:
    plan = make_plan(desired(*STACK), CurrentState())
    assert plan == Plan(
        revision="rev2",
        actions=(
            act(D, "broker", 0, "new app"),
            act(D, "database", 0, "new app"),
            act(D, "api", 1, "new app", deps=("database", "broker")),
            act(D, "gateway", 2, "new app", deps=("api",)),
            act(D, "worker", 2, "new app", deps=("api", "broker")),
        ),
    )
    assert [[a.app for a in g] for g in plan.generations()] == [
        ["broker", "database"], ["api"], ["gateway", "worker"]]


def test_synced_node_has_nothing_to_do() -> None:
    plan = make_plan(desired(*STACK), current(*(installed(s) for s in STACK)))
    assert plan == Plan("rev2", unchanged=("api", "broker", "database", "gateway", "worker"))
    assert plan.empty


def test_upgrade_and_reconfigure() -> None:
    new_api = app("api", "1.1", ("database", "broker"))
    new_db = app("database", run={"command": ["db", "--fast"]})
    specs = [new_db if s.name == "database" else new_api if s.name == "api" else s
             for s in STACK]
    plan = make_plan(desired(*specs), current(*(installed(s) for s in STACK)))
    assert plan == Plan(
        "rev2",
        actions=(
            act(C, "database", 0, "spec changed", frm="1.0"),
            act(U, "api", 1, "version 1.0 -> 1.1", frm="1.0", to="1.1",
                deps=("database", "broker")),
        ),
        unchanged=("broker", "gateway", "worker"),
    )


def test_removals_come_first_dependents_before_dependencies() -> None:
    keep = [s for s in STACK if s.name in ("broker", "database")]
    plan = make_plan(desired(*keep, app("metrics")), current(*(installed(s) for s in STACK)))
    assert plan == Plan(
        "rev2",
        actions=(
            act(X, "gateway", 0, "no longer desired on this node", frm="1.0", to=None,
                deps=("api",)),
            act(X, "worker", 0, "no longer desired on this node", frm="1.0", to=None,
                deps=("api", "broker")),
            act(X, "api", 1, "no longer desired on this node", frm="1.0", to=None,
                deps=("database", "broker")),
            act(D, "metrics", 0, "new app"),
        ),
        unchanged=("broker", "database"),
    )


def test_drift_is_healed_by_restarts() -> None:
    broker, database, api, worker, gateway = STACK
    plan = make_plan(
        desired(*STACK),
        current(
            installed(broker, running=False, phase="running"),
            installed(database, phase="failed", running=False),
            installed(api, phase="deploying"),
            installed(worker, phase="blocked", running=False),
            installed(gateway),
        ),
    )
    assert plan == Plan(
        "rev2",
        actions=(
            act(R, "broker", 0, "not running (drift)", frm="1.0"),
            act(R, "database", 0, "failed; starting again", frm="1.0"),
            act(R, "api", 1, "interrupted while deploying; starting again", frm="1.0",
                deps=("database", "broker")),
            act(R, "worker", 2, "was blocked by a dependency; starting again", frm="1.0",
                deps=("api", "broker")),
        ),
        unchanged=("gateway",),
    )


def test_the_mode_says_how_each_action_is_done_from_what_is_installed_and_alive() -> None:
    """An upgrade or reconfigure replaces a live version (and can roll back to it), installs
    afresh over one with no live process, and installs when nothing ever got installed; a
    restart starts an installed spec again, or installs it when nothing got installed."""
    a, b, c, d, e, f = (app(name) for name in "abcdef")
    v2 = {s.name: app(s.name, "2.0") for s in (a, b, c)}
    d_fast = app("d", run={"command": ["d", "--fast"]})
    plan = make_plan(
        desired(*v2.values(), d_fast, e, f),
        current(
            installed(a),  # alive: a process runs, or waits in restart backoff
            installed(b, phase="failed", running=False, alive=False),  # crash-looped
            installed(c, phase="blocked", running=False, alive=False, installed=False),
            installed(d, running=False, alive=False),
            installed(e, running=False, alive=False),
            installed(f, phase="failed", running=False, alive=False, installed=False),
        ),
    )
    up = "version 1.0 -> 2.0"
    assert plan == Plan(
        "rev2",
        actions=(
            act(U, "a", 0, up, frm="1.0", to="2.0", mode=Mode.REPLACE),
            act(U, "b", 0, up, frm="1.0", to="2.0", mode=Mode.REINSTALL),
            act(U, "c", 0, up, frm="1.0", to="2.0", mode=Mode.INSTALL),
            act(C, "d", 0, "spec changed", frm="1.0", mode=Mode.REINSTALL),
            act(R, "e", 0, "not running (drift)", frm="1.0", mode=Mode.RESTART),
            act(R, "f", 0, "failed; starting again", frm="1.0", mode=Mode.INSTALL),
        ),
    )
    # what each records when it succeeds: nothing was installed for c and f
    assert [(x.app, x.event) for x in plan.actions] == [
        ("a", "app.upgraded"), ("b", "app.upgraded"), ("c", "app.deployed"),
        ("d", "app.reconfigured"), ("e", "app.restarted"), ("f", "app.deployed")]
    assert [x.to_json()["mode"] for x in plan.actions] == [
        "replace", "reinstall", "install", "reinstall", "restart", "install"]


def test_suspended_apps_are_held_whether_by_spec_or_by_an_operator() -> None:
    broker, database, api, worker, gateway = STACK
    plan = make_plan(
        desired(broker, app("database", "2.0", suspend=True), app("api", "1.1", api.depends_on),
                worker, app("extra", suspend=True)),
        current(installed(broker, suspended=True), installed(database),
                installed(api), installed(worker), installed(gateway, suspended=True)),
    )
    assert plan == Plan(
        "rev2",
        # database and broker are suspended but running: their dependents go on
        actions=(act(U, "api", 1, "version 1.0 -> 1.1", frm="1.0", to="1.1",
                     deps=("database", "broker")),),
        held=(
            HeldApp("broker", "suspended by an operator"),
            HeldApp("database", "suspended in the spec"),
            HeldApp("extra", "suspended in the spec; not deployed"),
            HeldApp("gateway", "suspended by an operator; not removed until resumed"),
        ),
        unchanged=("worker",),
    )
    # suspended while down: what depends on it cannot start, so it waits
    down = make_plan(
        desired(broker, database, app("api", "1.1", api.depends_on)),
        current(installed(broker, suspended=True, running=False), installed(database),
                installed(api)),
    )
    assert down.held == (
        HeldApp("api", "waiting for dependency broker: suspended by an operator"),
        HeldApp("broker", "suspended by an operator"),
    )
    assert down.actions == ()


def test_a_failed_spec_is_not_retried_and_holds_its_dependents_changes() -> None:
    broker, database, api, worker, gateway = STACK
    bad_api = app("api", "2.0", api.depends_on)
    plan = make_plan(
        desired(broker, database, bad_api, app("worker", "1.1", worker.depends_on), gateway),
        current(
            installed(broker), installed(database),
            # rolled back to 1.0 after 2.0 failed: still serving
            installed(api, failed_spec_hash=bad_api.spec_hash()),
            installed(worker),
            installed(gateway, running=False),
        ),
    )
    assert plan == Plan(
        "rev2",
        # gateway crashed: restarting it at its current spec is safe, api still serves
        actions=(act(R, "gateway", 2, "not running (drift)", frm="1.0", deps=("api",)),),
        held=(
            HeldApp("api", HELD_FAILED),
            HeldApp("worker", f"dependency api is held: {HELD_FAILED}"),
        ),
        unchanged=("broker", "database"),
    )
    # the operator's fix: a changed spec is tried again
    fixed = app("api", "2.0.1", api.depends_on)
    again = make_plan(
        desired(broker, database, fixed, worker, gateway),
        current(*(installed(s) for s in (broker, database, worker, gateway)),
                installed(api, failed_spec_hash=bad_api.spec_hash())),
    )
    assert again.actions == (act(U, "api", 1, "version 1.0 -> 2.0.1", frm="1.0", to="2.0.1",
                                 deps=("database", "broker")),)


def test_a_dependency_that_is_down_and_held_holds_everything_after_it() -> None:
    broker, database, api, _worker, gateway = STACK
    plan = make_plan(
        desired(*STACK),
        current(installed(broker), installed(database, phase="failed", running=False,
                                             failed_spec_hash=database.spec_hash()),
                installed(api, running=False), installed(gateway)),
    )
    assert plan == Plan(
        "rev2",
        held=(
            HeldApp("api", f"waiting for dependency database: {HELD_FAILED}"),
            HeldApp("database", HELD_FAILED),
            HeldApp("worker", "waiting for dependency api: waiting for dependency database: "
                              f"{HELD_FAILED}"),
        ),
        # gateway has nothing to do: it keeps running whatever happens upstream
        unchanged=("broker", "gateway"),
    )


def test_an_invalid_spec_holds_its_app_and_dependents_changes_but_never_removes() -> None:
    broker, database, _api, worker, _gateway = STACK
    problem = SpecProblem("apps/api.yaml", 2, 10, "was read as a number", "version")
    plan = make_plan(
        desired(broker, database, app("worker", "1.1", worker.depends_on), app("new"),
                invalid=frozenset({"api", "ghost"}), problems=(problem,)),
        current(*(installed(s) for s in STACK)),
    )
    assert plan == Plan(
        "rev2",
        actions=(act(D, "new", 0, "new app"),),
        held=(
            HeldApp("api", "spec invalid at this revision; kept at 1.0 as it is"),
            HeldApp("gateway", HELD_SPEC_ERRORS),
            HeldApp("ghost", "spec invalid at this revision; not deployed"),
            HeldApp("worker", "dependency api is held: spec invalid at this revision; "
                              "kept at 1.0 as it is"),
        ),
        unchanged=("broker", "database"),
    )


def test_any_spec_error_holds_every_removal() -> None:
    # a YAML syntax error names no app: the apps in that file simply look gone
    problem = SpecProblem("apps/broken.yaml", 3, 1, "YAML syntax error: ...")
    plan = make_plan(desired(STACK[0], problems=(problem,)),
                     current(*(installed(s) for s in STACK)))
    assert plan == Plan(
        "rev2",
        held=tuple(HeldApp(n, HELD_SPEC_ERRORS)
                   for n in ("api", "database", "gateway", "worker")),
        unchanged=("broker",),
    )
    assert plan.removals() == ()


TREE = {
    "apps/stack.yaml": """
name: api
version: "1.0"
depends_on: [database]
---
name: database
version: "1.0"
---
name: gateway
version: "1.0"
nodes: {match: {role: gateway}}
depends_on: [api]
---
name: edge-cache
version: "1.0"
nodes: {in: {role: [edge]}}
""",
}


def test_targeting_by_labels_gives_each_node_its_own_plan() -> None:
    result = load_files([SpecFile(p, t.encode()) for p, t in TREE.items()])
    assert result.ok
    gateway = make_plan(desired_for_node(result, "g1", {"role": "gateway"}, "rev2"),
                        CurrentState())
    assert gateway.actions == (
        act(D, "database", 0, "new app"),
        act(D, "api", 1, "new app", deps=("database",)),
        act(D, "gateway", 2, "new app", deps=("api",)),
    )
    edge_node = desired_for_node(result, "e1", {"role": "edge"}, "rev2")
    # the gateway label went away from e1: gateway is removed there, edge-cache deployed
    was_gateway = current(installed(result.apps["gateway"]), installed(result.apps["api"]),
                          installed(result.apps["database"]))
    assert make_plan(edge_node, was_gateway) == Plan(
        "rev2",
        actions=(
            act(X, "gateway", 0, "no longer desired on this node", frm="1.0", to=None,
                deps=("api",)),
            act(D, "edge-cache", 0, "new app"),
        ),
        unchanged=("api", "database"),
    )


def test_plan_json_is_the_whole_plan() -> None:
    plan = make_plan(desired(STACK[0]), current(installed(app("old"))))
    assert plan.to_json() == {
        "revision": "rev2",
        "actions": [
            {"kind": "remove", "app": "old", "generation": 0,
             "reason": "no longer desired on this node", "from_version": "1.0",
             "to_version": None, "depends_on": [], "mode": "remove"},
            {"kind": "deploy", "app": "broker", "generation": 0, "reason": "new app",
             "from_version": None, "to_version": "1.0", "depends_on": [], "mode": "install"},
        ],
        "held": [],
        "unchanged": [],
        "metadata_only": [],
    }


def test_a_metadata_change_is_stored_without_touching_the_process() -> None:
    """Relabeling (labels, layer, description, depends_on) restarts nothing: the app is
    listed as metadata-only for the executor to store; a command change still reconfigures."""
    def meta(spec: AppSpec) -> CurrentApp:
        return installed(spec, metadata_hash=spec.metadata_hash())

    db = app("database", run={"command": ["db"]})
    relabeled = app("database", run={"command": ["db"]}, labels={"tier": "data"},
                    layer="storage", description="the main database")
    api = app("api", deps=("database",))
    api_without_dep = app("api")
    plan = make_plan(desired(relabeled, api_without_dep), current(meta(db), meta(api)))
    assert plan == Plan("rev2", unchanged=("api", "database"),
                        metadata_only=("api", "database"))
    assert plan.empty

    new_command = app("database", run={"command": ["db", "--fast"]}, labels={"tier": "data"})
    plan = make_plan(desired(new_command), current(meta(db)))
    assert plan == Plan("rev2", actions=(act(C, "database", 0, "spec changed", frm="1.0"),))

    # a crashed app restarts at the same process spec and gets its new metadata stored
    plan = make_plan(desired(relabeled), current(replace(meta(db), running=False)))
    assert plan == Plan("rev2", actions=(act(R, "database", 0, "not running (drift)", "1.0"),),
                        metadata_only=("database",))


def test_a_held_app_keeps_what_it_depends_on() -> None:
    broker, database, api, worker, gateway = STACK
    # worker and api left the tree; worker is suspended by an operator, so it stays, and
    # so must api and, through it, nothing else (database and broker are still desired)
    plan = make_plan(
        desired(broker, database, gateway.model_copy(update={"depends_on": []})),
        current(installed(broker), installed(database), installed(api),
                installed(worker, suspended=True),
                installed(gateway, metadata_hash=gateway.metadata_hash())),
    )
    assert plan == Plan(
        "rev2",
        held=(
            HeldApp("api", "still needed by worker, which is held"),
            HeldApp("worker", "suspended by an operator; not removed until resumed"),
        ),
        unchanged=("broker", "database", "gateway"),
        metadata_only=("gateway",),
    )


def test_a_bad_push_end_to_end_touches_nothing_that_runs() -> None:
    """Loader -> desired_for_node -> planner: a push that breaks api's document and deletes
    the gateway's file changes and removes nothing, and says why."""
    good = load_files([SpecFile(p, t.encode()) for p, t in TREE.items()])
    running = current(*(installed(good.apps[n]) for n in ("api", "database", "gateway")))
    broken = TREE["apps/stack.yaml"].replace('name: api\nversion: "1.0"',
                                             "name: api\nversion: 1.1")
    broken = broken[: broken.index("---\nname: gateway")]
    result = load_files([SpecFile("apps/stack.yaml", broken.encode())])
    desired = desired_for_node(result, "g1", {"role": "gateway"}, "rev2")
    assert [str(p) for p in desired.problems] == [
        'apps/stack.yaml:3:10: version: 1.1 was read as a number; quote it (version: "1.1") '
        "so YAML keeps it as written"
    ]
    assert make_plan(desired, running) == Plan(
        "rev2",
        held=(
            HeldApp("api", "spec invalid at this revision; kept at 1.0 as it is"),
            HeldApp("gateway", HELD_SPEC_ERRORS),
        ),
        unchanged=("database",),
    )


def test_spec_hashes_are_memoized_per_spec_and_never_carried_into_a_changed_copy() -> None:
    spec = AppSpec.model_validate({"name": "web", "version": "1", "labels": {"a": "1"}})
    first = (spec.spec_hash(), spec.metadata_hash())
    assert (spec.spec_hash(), spec.metadata_hash()) == first  # the memo
    relabeled = spec.model_copy(update={"labels": {"a": "2"}})
    assert relabeled.spec_hash() == first[0] and relabeled.metadata_hash() != first[1]
    upgraded = spec.model_copy(update={"version": "2"})
    assert upgraded.spec_hash() != first[0]
