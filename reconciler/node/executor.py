"""Executor: applies a Plan (removals, then a DAG of actions), each the step its Mode names."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reconciler.core.plan import Action, ActionKind, Mode, Plan
from reconciler.core.spec import METADATA_FIELDS, AppSpec
from reconciler.core.states import EventType, Outcome
from reconciler.node.app_changes import RUNNING, AppChanges, EventRecorder, ms_since
from reconciler.node.dag import run_as_dag
from reconciler.node.instances import (
    ActionFailed,
    Artifacts,
    HealthHooks,
    Instances,
    ReadRepoFile,
)
from reconciler.node.runtimes.base import LaunchSpec, Runtime
from reconciler.node.store import AppRecord, Store, spec_to_json
from reconciler.node.upgrades import Upgrades

log = logging.getLogger(__name__)

# Actions of one plan carried out at once (artifact installs, starts and health waits)
MAX_PARALLEL = 64
# One Mode's step: (action, its desired spec, read_repo_file, revision, monotonic start)
Step = Callable[
    [Action, AppSpec, ReadRepoFile | None, str, float], Awaitable[tuple[Outcome, str]]
]


class Hooks(EventRecorder, HealthHooks, Protocol):
    """The agent's side of the executor: events, health watching and probes, dependencies."""

    async def dependency_problem(self, name: str) -> str | None:
        """None when app `name` runs and is healthy, else why not."""


@dataclass(frozen=True)
class ActionResult:
    """What one action came to: failure is a value, not an exception."""

    action: Action
    outcome: Outcome  # skipped: blocked by a dependency
    message: str = ""
    duration_ms: float = 0.0


class Executor:
    """Applies plans for one node: each action runs the step its Mode names, and nothing
    here decides again what the plan decided. Every state change and its event are one
    store transaction (AppChanges); one version's install, start, health wait and stop are
    Instances'; replacing a live version (upgrade intent, rollback, resume) is Upgrades'."""

    def __init__(
        self,
        *,
        node_id: str,
        store: Store,
        runtime: Runtime,
        artifacts: Artifacts,
        hooks: Hooks,
        log_dir: Path,
        port_offset: int = 0,
        telemetry: Any = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.hooks = hooks
        self.telemetry = telemetry
        self.changes = AppChanges(store, hooks)
        self.instances = Instances(
            node_id=node_id, runtime=runtime, artifacts=artifacts, hooks=hooks,
            log_dir=log_dir, port_offset=port_offset, base_env=base_env,
        )
        self.upgrades = Upgrades(store=store, runtime=runtime, instances=self.instances,
                                 hooks=hooks, changes=self.changes)
        self._steps: dict[Mode, Step] = {
            Mode.INSTALL: self._deploy,
            Mode.REINSTALL: self._deploy,
            Mode.REPLACE: self.upgrades.replace,
            Mode.RESTART: self._restart,
        }

    def launch_for(self, spec: AppSpec, install_dir: Path) -> LaunchSpec | None:
        """The LaunchSpec of `spec` installed in `install_dir` (None: the app runs nothing)."""
        return self.instances.launch_for(spec, install_dir)

    async def resume(self, record: AppRecord, new_launch: LaunchSpec | None,
                     old_alive: bool) -> tuple[Outcome, str]:
        """Finish or undo a replace that an agent crash cut short (Upgrades.resume)."""
        return await self.upgrades.resume(record, new_launch, old_alive)

    # -- plan -----------------------------------------------------------------------------
    async def apply(
        self, plan: Plan, desired: Mapping[str, AppSpec], read_repo_file: ReadRepoFile | None,
        superseded: Callable[[], bool] | None = None, first: set[str] | None = None,
    ) -> list[ActionResult]:
        """Removals first (dependents first), then the rest as a DAG: each action starts as
        soon as the actions of its own dependencies in this plan are done (at most
        MAX_PARALLEL at once); one whose dependency failed here, or is not healthy now, is
        blocked, independent apps go on. Once `superseded()` (a newer revision is waiting)
        no further action starts; running ones finish. Results are in plan order, without
        the actions never started. Actions of the apps in `first` get the first free slots
        (what a newer revision changed, when a run plans again)."""
        self._store_metadata(plan.metadata_only, desired)
        results: list[ActionResult] = []
        removal_groups: dict[int, list[Action]] = {}
        for action in plan.removals():
            removal_groups.setdefault(action.generation, []).append(action)
        for generation in sorted(removal_groups):
            results += await asyncio.gather(
                *(self._run(a, None, read_repo_file, plan.revision, set())
                  for a in removal_groups[generation])
            )
        rest = [a for a in plan.actions if a.kind is not ActionKind.REMOVE]
        by_app = await run_as_dag(
            rest,
            lambda action, failed: self._run(action, desired.get(action.app), read_repo_file,
                                             plan.revision, failed),
            lambda result: result.outcome == "success",
            limit=MAX_PARALLEL, superseded=superseded, first=first,
        )
        results += [by_app[a.app] for a in rest if a.app in by_app]
        return results

    def _store_metadata(self, names: tuple[str, ...], desired: Mapping[str, AppSpec]) -> None:
        """Metadata-only changes (Plan.metadata_only): store the new spec so status, removal
        order and dependency gating use it; the process is not touched. One transaction, one
        app.reconfigured event per app with data {"restart": false, "changed": [fields]}."""
        if not names:
            return
        with self.store.transaction():
            for name in names:
                spec, record = desired.get(name), self.store.get_app(name)
                if spec is None or record is None:
                    continue
                old = json.loads(record.spec_json)
                new = json.loads(spec_to_json(spec))
                changed = [f for f in METADATA_FIELDS if old.get(f) != new.get(f)]
                self.changes.transition(
                    name, dict(spec_json=spec_to_json(spec), spec_hash=spec.spec_hash()),
                    "app.reconfigured", version=spec.version, from_version=record.version,
                    outcome="success", message=f"{', '.join(changed)} changed; not restarted",
                    data={"restart": False, "changed": changed},
                )

    async def _run(
        self, action: Action, spec: AppSpec | None, read_repo_file: ReadRepoFile | None,
        revision: str, failed: set[str],
    ) -> ActionResult:
        started = time.monotonic()
        span = (self.telemetry.span("action", kind=action.kind.value, app=action.app)
                if self.telemetry else contextlib.nullcontext())
        outcome: Outcome
        with span as current:
            try:
                outcome, message = await self._carry_out(
                    action, spec, read_repo_file, revision, failed, started
                )
            except Exception as exc:  # a bug must not kill the reconcile loop: the app fails
                log.exception("%s %s: unexpected error", action.kind.value, action.app)
                outcome, message = "failure", f"internal error: {type(exc).__name__}: {exc}"
                self._fail_unexpected(action, spec, message)
            if current is not None:
                current.set_attribute("outcome", outcome)
        if self.telemetry:
            self.telemetry.actions.add(1, {"kind": action.kind.value, "outcome": outcome})
        return ActionResult(action, outcome, message, ms_since(started))

    async def _carry_out(
        self, action: Action, spec: AppSpec | None, read_repo_file: ReadRepoFile | None,
        revision: str, failed: set[str], started: float,
    ) -> tuple[Outcome, str]:
        """The step action.mode names. Only what the plan cannot know stops it: a dependency
        that failed in this run or is not healthy now blocks the app (skipped)."""
        if action.mode is Mode.REMOVE:
            return await self._remove(action, started)
        if spec is None:
            return "failure", "no desired spec for this app"
        if problem := await self._dependency_problem(spec, failed):
            self._blocked(spec, problem)
            return "skipped", problem
        return await self._steps[action.mode](action, spec, read_repo_file, revision, started)

    async def _dependency_problem(self, spec: AppSpec, failed: set[str]) -> str | None:
        for dep in spec.depends_on:
            if dep in failed:
                return f"dependency {dep} failed"
            problem = await self.hooks.dependency_problem(dep)
            if problem:
                return f"dependency {dep} failed: {problem}"
        return None

    def _blocked(self, spec: AppSpec, reason: str) -> None:
        record = self.store.get_app(spec.name)
        if record is not None and record.phase == "blocked" and record.message == reason:
            return  # still blocked for the same reason: said so already
        # an installed app keeps running what it runs; it is just not changed
        change: dict[str, Any] | AppRecord = dict(phase="blocked", message=reason)
        if record is None:
            change = AppRecord(
                name=spec.name, version=spec.version, spec_json=spec_to_json(spec),
                spec_hash=spec.spec_hash(), phase="blocked", message=reason,
            )
        self.changes.transition(spec.name, change, "app.blocked", version=spec.version,
                                outcome="skipped", message=reason)

    def _fail_unexpected(self, action: Action, spec: AppSpec | None, message: str) -> None:
        if self.store.get_app(action.app) is None:
            return
        self.changes.transition(action.app, dict(phase="failed", message=message),
                                "app.failed", version=spec.version if spec else None,
                                outcome="failure", message=message)

    # -- steps (one per Mode) ------------------------------------------------------------
    async def _deploy(
        self, action: Action, spec: AppSpec, read_repo_file: ReadRepoFile | None,
        revision: str, started: float,
    ) -> tuple[Outcome, str]:
        """INSTALL and REINSTALL: a fresh record of this spec, then install and start it."""
        record = AppRecord(
            name=spec.name, version=spec.version, spec_json=spec_to_json(spec),
            spec_hash=spec.spec_hash(), phase="deploying", suspended=False,
        )
        from_version = action.from_version if action.mode is Mode.REINSTALL else None
        if spec.run is None and spec.health.probe_kind is None:
            return await self._deploy_files(record, spec, read_repo_file, revision, started,
                                            action.event, from_version)
        self.changes.transition(spec.name, record)
        return await self._bring_up(spec, read_repo_file, revision, started, action.event,
                                    from_version=from_version)

    async def _deploy_files(
        self, record: AppRecord, spec: AppSpec, read_repo_file: ReadRepoFile | None,
        revision: str, started: float, event: EventType, from_version: str | None,
    ) -> tuple[Outcome, str]:
        """An app of files only (no process, no probe): nothing runs that a crash could
        leave behind, so the install is recorded in one transaction at its end (a crash
        before it just installs again). Thousands of such apps deploy at one commit each."""
        try:
            install_dir = await self.instances.install(spec, read_repo_file)
        except ActionFailed as exc:
            self.changes.transition(spec.name, record)
            return self.changes.failed(spec, str(exc), exc.permanent, started)
        self.changes.transition(
            spec.name, dataclasses.replace(record, install_dir=str(install_dir),
                                           applied_revision=revision,
                                           **RUNNING),
            event, version=spec.version, outcome="success", duration_ms=ms_since(started),
            from_version=from_version,
        )
        return "success", ""

    async def _bring_up(
        self, spec: AppSpec, read_repo_file: ReadRepoFile | None, revision: str,
        started: float, event: EventType, **event_fields: Any,
    ) -> tuple[Outcome, str]:
        """Install, start and wait healthy; then mark the app running and record `event`,
        in one transaction. A failure becomes the app's failed state (AppChanges.failed)."""
        try:
            install_dir = await self.instances.install(spec, read_repo_file)
            self.store.update_app(spec.name, install_dir=str(install_dir))
            await self.instances.start(spec, install_dir)
        except ActionFailed as exc:
            return self.changes.failed(spec, str(exc), exc.permanent, started)
        self.changes.transition(
            spec.name, RUNNING | dict(applied_revision=revision), event,
            version=spec.version, outcome="success", duration_ms=ms_since(started),
            **event_fields,
        )
        return "success", ""

    async def _restart(
        self, action: Action, spec: AppSpec, read_repo_file: ReadRepoFile | None,
        revision: str, started: float,
    ) -> tuple[Outcome, str]:
        """RESTART: the app should run this very (installed) spec but does not; start it again."""
        self.changes.transition(spec.name,
                                dict(phase="deploying", message="restarting: not running"))
        await self.instances.stop(spec.name)  # a process in restart backoff: take over cleanly
        return await self._bring_up(spec, read_repo_file, revision, started, action.event,
                                    message="started again: it was not running")

    async def _remove(self, action: Action, started: float) -> tuple[Outcome, str]:
        """REMOVE: stop the app, delete its files, then its record."""
        record = self.store.get_app(action.app)
        if record is None:
            return "success", ""
        self.changes.transition(action.app, dict(phase="removing", message=action.reason))
        await self.instances.stop(action.app)
        try:
            await asyncio.to_thread(self.artifacts.remove_app, action.app)
        except OSError as exc:
            log.warning("%s: could not remove its files: %s", action.app, exc)
        self.changes.transition(action.app, None, action.event, version=record.version,
                                outcome="success", duration_ms=ms_since(started),
                                message=action.reason)
        return "success", ""

    async def stop_all(self, order: list[list[str]]) -> None:
        """Stop every app, group by group (dependents first), for --stop-apps-on-exit."""
        for group in order:
            await asyncio.gather(*(self.instances.stop(name) for name in group))

