"""The executor does what the plan says: for each kind and mode, one real Executor and Store."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from reconciler.core.errors import RuntimeFailure
from reconciler.core.events import Event, make_event
from reconciler.core.plan import Action, ActionKind, Mode, make_plan
from reconciler.core.spec import AppSpec
from reconciler.core.state import DesiredState
from reconciler.node.artifacts import ArtifactStore
from reconciler.node.dag import run_as_dag
from reconciler.node.executor import Executor
from reconciler.node.runtimes.base import (
    ALIVE_STATES,
    LaunchSpec,
    ProcessRecord,
    ProcessStats,
    ProcState,
)
from reconciler.node.store import AppRecord, Store, spec_to_json


class MemoryRuntime:
    """A Runtime that runs nothing: it keeps each app's state and logs every start and stop."""

    def __init__(self) -> None:
        self.apps: dict[str, tuple[ProcState, str]] = {}  # name -> (state, version)
        self.calls: list[str] = []
        self._pids = itertools.count(10_000)

    async def start(self, launch: LaunchSpec) -> ProcessRecord:
        if self.state(launch.name) in ALIVE_STATES:
            raise RuntimeFailure(f"{launch.name}: already running; stop it first")
        self.calls.append(f"start {launch.name} {launch.version}")
        self.apps[launch.name] = ("running", launch.version)
        pid = next(self._pids)
        return ProcessRecord(launch.name, launch.version, pid, pid, 0.0)

    async def stop(self, name: str) -> None:
        self.calls.append(f"stop {name}")
        self.apps.pop(name, None)

    def adopt(self, launch: LaunchSpec, record: ProcessRecord) -> bool:
        return False

    def rename(self, old: str, new: str) -> None:
        self.calls.append(f"rename {old} {new}")
        if old in self.apps:
            self.apps[new] = self.apps.pop(old)

    def stats(self, name: str) -> ProcessStats | None:
        if name not in self.apps:
            return None
        state, version = self.apps[name]
        return ProcessStats(name, version, state, None, 0, None, None, None, None, None)

    def state(self, name: str) -> ProcState | None:
        return self.apps[name][0] if name in self.apps else None

    def names(self) -> set[str]:
        return set(self.apps)

    async def close(self, stop_apps: bool) -> None:
        self.apps.clear()


@dataclass
class RecordingHooks:
    """executor.Hooks: events go to the store's outbox; versions in `sick` never get healthy."""

    store: Store
    sick: set[str] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)

    def record(self, type: Any, **fields: Any) -> Event:
        event = make_event(type, "n1", datetime.now(UTC), **fields)
        self.store.add_event(event)
        self.events.append(event)
        return event

    def watch(self, spec: AppSpec, launch: LaunchSpec | None) -> None:
        pass

    async def unwatch(self, name: str) -> None:
        pass

    async def wait_healthy(self, spec: AppSpec, launch: LaunchSpec | None,
                           is_alive: Any, timeout: float | None = None) -> tuple[bool, str]:
        return (False, "probe failed") if spec.version in self.sick else (True, "")

    async def dependency_problem(self, name: str) -> str | None:
        return None


def web(version: str = "1", *args: str) -> AppSpec:
    return AppSpec(name="web", version=version, run={"command": ["serve", *args]})


V1, V2, V1_FAST = web("1"), web("2"), web("1", "--fast")


@dataclass(frozen=True)
class Before:
    """What the node has for `web` before the plan: a record (installed or not) and a process
    in the runtime in `proc` state (None: the runtime knows nothing of it)."""

    spec: AppSpec | None = None
    installed: bool = True
    phase: str = "running"
    proc: ProcState | None = "running"


@dataclass(frozen=True)
class Case:
    before: Before
    desired: AppSpec | None
    kind: ActionKind
    mode: Mode
    calls: list[str]
    events: list[tuple[str, str, str | None]]  # (type, version, from_version)
    after: tuple[str, str] | None  # (phase, version) of the record; None: no record
    sick: frozenset[str] = frozenset()


CASES = {
    "deploy: install": Case(
        Before(), V1, ActionKind.DEPLOY, Mode.INSTALL,
        ["start web 1"], [("app.deployed", "1", None)], ("running", "1")),
    "upgrade a live version: replace": Case(
        Before(V1), V2, ActionKind.UPGRADE, Mode.REPLACE,
        ["stop web", "start web 2"], [("app.upgraded", "2", "1")], ("running", "2")),
    "upgrade one in restart backoff: replace": Case(
        Before(V1, proc="backoff"), V2, ActionKind.UPGRADE, Mode.REPLACE,
        ["stop web", "start web 2"], [("app.upgraded", "2", "1")], ("running", "2")),
    "upgrade that is not healthy: replace, rolled back": Case(
        Before(V1), V2, ActionKind.UPGRADE, Mode.REPLACE,
        ["stop web", "start web 2", "stop web", "start web 1"],
        [("app.rolled-back", "1", "2")], ("running", "1"), sick=frozenset({"2"})),
    "upgrade a crash-looped version: reinstall": Case(
        Before(V1, phase="failed", proc="crash-loop"), V2, ActionKind.UPGRADE, Mode.REINSTALL,
        ["start web 2"], [("app.upgraded", "2", "1")], ("running", "2")),
    "upgrade one never installed (blocked): install": Case(
        Before(V1, installed=False, phase="blocked", proc=None), V2, ActionKind.UPGRADE,
        Mode.INSTALL, ["start web 2"], [("app.deployed", "2", None)], ("running", "2")),
    "reconfigure a live version: replace": Case(
        Before(V1), V1_FAST, ActionKind.RECONFIGURE, Mode.REPLACE,
        ["stop web", "start web 1"], [("app.reconfigured", "1", "1")], ("running", "1")),
    "reconfigure one that exited for good: reinstall": Case(
        Before(V1, proc="exited"), V1_FAST, ActionKind.RECONFIGURE, Mode.REINSTALL,
        ["start web 1"], [("app.reconfigured", "1", "1")], ("running", "1")),
    "restart after drift: restart": Case(
        Before(V1, proc=None), V1, ActionKind.RESTART, Mode.RESTART,
        ["stop web", "start web 1"], [("app.restarted", "1", None)], ("running", "1")),
    "restart a deploy that failed to install: install": Case(
        Before(V1, installed=False, phase="failed", proc=None), V1, ActionKind.RESTART,
        Mode.INSTALL, ["start web 1"], [("app.deployed", "1", None)], ("running", "1")),
    "remove: remove": Case(
        Before(V1), None, ActionKind.REMOVE, Mode.REMOVE,
        ["stop web"], [("app.removed", "1", None)], None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_the_executor_does_what_the_plan_says(case: Case, tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    artifacts = ArtifactStore(tmp_path / "apps")
    runtime = MemoryRuntime()
    hooks = RecordingHooks(store, sick=set(case.sick))
    before = case.before
    if before.spec is not None:
        install_dir = artifacts.install(before.spec) if before.installed else None
        store.put_app(AppRecord(
            name="web", version=before.spec.version, spec_json=spec_to_json(before.spec),
            spec_hash=before.spec.spec_hash(), phase=before.phase,  # type: ignore[arg-type]
            install_dir=str(install_dir) if install_dir else None,
        ))
        if before.proc is not None:
            runtime.apps["web"] = (before.proc, before.spec.version)
    # the facts as the agent gathers them (Agent._current_state)
    alive = {n for n in runtime.names() if runtime.state(n) in ALIVE_STATES}
    current = store.current_state(running=alive, alive=alive)
    apps = {"web": case.desired} if case.desired else {}
    plan = make_plan(DesiredState("rev1", apps), current)

    [action] = plan.actions
    assert (action.kind, action.mode) == (case.kind, case.mode)
    executor = Executor(node_id="n1", store=store, runtime=runtime, artifacts=artifacts,
                        hooks=hooks, log_dir=tmp_path / "logs")
    [result] = await executor.apply(plan, apps, None)

    assert runtime.calls == case.calls
    assert [(e.type, e.version, e.from_version) for e in hooks.events] == case.events
    if result.outcome == "success":
        assert hooks.events[-1].type == action.event  # the plan says which event it records
    record = store.get_app("web")
    assert ((record.phase, record.version) if record else None) == case.after
    store.close()


def _install(app: str, generation: int, *depends_on: str) -> Action:
    return Action(ActionKind.DEPLOY, app, generation, "new", depends_on=depends_on,
                  mode=Mode.INSTALL)


async def test_the_dag_runs_dependents_after_their_dependencies_and_stops_on_superseded() -> None:
    """run_as_dag: a dependent starts once its dependency's action is done and hears that
    it failed; `first` jumps the queue; once superseded, nothing (and no dependent) starts."""
    db, cache, web = _install("db", 0), _install("cache", 0), _install("web", 1, "db", "cache")
    log: list[str] = []

    async def run_one(action: Action, failed: set[str]) -> tuple[str, bool]:
        await asyncio.sleep(0)  # let the others run: order comes from the dependencies
        log.append(f"{action.app} failed={sorted(failed)}")
        return action.app, action.app != "db"

    done = await run_as_dag([db, cache, web], run_one, lambda result: result[1], limit=1,
                            first={"cache"})
    assert log == ["cache failed=[]", "db failed=[]", "web failed=['db']"]
    assert set(done) == {"db", "cache", "web"}

    log.clear()
    done = await run_as_dag([db, cache, web], run_one, lambda result: result[1], limit=1,
                            superseded=lambda: bool(log))
    assert log == ["db failed=[]"] and set(done) == {"db"}
