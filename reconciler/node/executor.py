"""Executor: applies a Plan (removals, then generations in parallel), health gates, rollback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from reconciler.core.envfile import parse_env
from reconciler.core.errors import ArtifactError, ReconcileError, SourceError
from reconciler.core.events import Event
from reconciler.core.plan import Action, ActionKind, Mode, Plan
from reconciler.core.spec import METADATA_FIELDS, AppSpec
from reconciler.core.states import EventType, Outcome
from reconciler.node.bounded import RefusedFile, read_regular
from reconciler.node.runtimes.base import (
    ALIVE_STATES,
    NEXT_SUFFIX,
    LaunchSpec,
    RestartPolicy,
    Runtime,
)
from reconciler.node.store import AppRecord, Store, UpgradeIntent, spec_to_json
from reconciler.node.transitions import transition

log = logging.getLogger(__name__)

ReadRepoFile = Callable[[str], bytes]
# Actions of one plan carried out at once (artifact installs, starts and health waits)
MAX_PARALLEL = 64
# One Mode's step: (action, its desired spec, read_repo_file, revision, monotonic start)
Step = Callable[
    [Action, AppSpec, ReadRepoFile | None, str, float], Awaitable[tuple[Outcome, str]]
]


class Artifacts(Protocol):
    """What the executor needs from reconciler.node.artifacts.ArtifactStore."""

    def install(self, spec: AppSpec, read_repo_file: ReadRepoFile | None = None) -> Path: ...

    def gc(self, name: str, keep: set[Path]) -> list[Path]: ...

    def remove_app(self, name: str) -> None: ...


class Hooks(Protocol):
    """The agent's side of the executor: events, health watching, health probes."""

    def record(self, type: EventType, **fields: Any) -> Event:
        """Queue an event in the store (inside the caller's transaction)."""

    def watch(self, spec: AppSpec, launch: LaunchSpec | None) -> None:
        """Start periodic health probing of a running app."""

    async def unwatch(self, name: str) -> None: ...

    async def wait_healthy(
        self, spec: AppSpec, launch: LaunchSpec | None, is_alive: Callable[[], bool],
        timeout: float | None = None,
    ) -> tuple[bool, str]:
        """Probe until healthy, dead, definitely broken or `timeout` (default: the spec's
        start_timeout): (ok, message)."""

    async def dependency_problem(self, name: str) -> str | None:
        """None when app `name` runs and is healthy, else why not."""


@dataclass(frozen=True)
class ActionResult:
    """What one action came to: failure is a value, not an exception."""

    action: Action
    outcome: Outcome  # skipped: blocked by a dependency
    message: str = ""
    duration_ms: float = 0.0


class ActionFailed(Exception):
    """An app step failed; `permanent` is False for errors worth retrying (source hiccups)."""

    def __init__(self, message: str, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


def read_env_file(path: Path) -> dict[str, str]:
    """An app's env file (core.envfile.parse_env): a regular UTF-8 file of at most
    MAX_ENV_FILE_BYTES without NUL bytes. Errors name the file and line, never a value."""
    try:
        data = read_regular(path, MAX_ENV_FILE_BYTES)
        text = data.decode("utf-8")
    except RefusedFile as exc:
        raise ActionFailed(f"env file {path}: {exc}") from None
    except UnicodeDecodeError:
        raise ActionFailed(f"env file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ActionFailed(f"env file {path}: {exc.strerror or exc}") from exc
    try:
        return parse_env(text, f"env file {path}")
    except ValueError as exc:
        raise ActionFailed(str(exc)) from None


# An env file holds a few settings; anything bigger is not one.
MAX_ENV_FILE_BYTES = 256 * 1024


class Executor:
    """Applies plans for one node: each action runs the step its Mode names, and nothing
    here decides again what the plan decided. Every state change and its event are one
    store transaction (transitions.transition); processes go through the Runtime; artifacts
    install in a thread."""

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
        self.node_id = node_id
        self.store = store
        self.runtime = runtime
        self.artifacts = artifacts
        self.hooks = hooks
        self.log_dir = log_dir
        self.port_offset = port_offset
        self.telemetry = telemetry
        self.base_env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
        if base_env is not None:
            self.base_env = dict(base_env)
        self._steps: dict[Mode, Step] = {
            Mode.INSTALL: self._deploy,
            Mode.REINSTALL: self._deploy,
            Mode.REPLACE: self._replace,
            Mode.RESTART: self._restart,
        }

    # -- launch ---------------------------------------------------------------------------
    def launch_for(self, spec: AppSpec, install_dir: Path) -> LaunchSpec | None:
        """The LaunchSpec of `spec` installed in `install_dir` (None: the app runs nothing)."""
        run = spec.run
        if run is None:
            return None
        env = dict(self.base_env)
        for name in run.env_files:
            path = Path(name) if os.path.isabs(name) else install_dir / name
            env.update(read_env_file(path))
        env.update(run.env)
        env.update({
            "GITOPS_NODE_ID": self.node_id,
            "GITOPS_APP_DIR": str(install_dir),
            "GITOPS_PORT_OFFSET": str(self.port_offset),
        })
        argv = ("/bin/sh", "-c", run.command[0]) if run.shell else tuple(run.command)
        workdir = install_dir
        if run.workdir:
            workdir = Path(run.workdir) if os.path.isabs(run.workdir) else install_dir / run.workdir
        policy = spec.restart
        return LaunchSpec(
            name=spec.name, version=spec.version, argv=argv, env=env, workdir=workdir,
            log_dir=self.log_dir, stop_signal=run.stop_signal, stop_timeout=run.stop_timeout,
            restart=RestartPolicy(
                policy=policy.policy, backoff_initial=policy.backoff.initial,
                backoff_max=policy.backoff.max, max_restarts=policy.max_restarts,
                window=policy.window,
            ),
        )

    def is_alive(self, name: str) -> bool:
        return self.runtime.state(name) == "running"

    def _transition(self, name: str, change: Mapping[str, Any] | AppRecord | None,
                    event: EventType | None = None, **fields: Any) -> None:
        transition(self.store, self.hooks.record, name, change, event, **fields)

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
        failed: set[str] = set()
        slots = asyncio.Semaphore(MAX_PARALLEL)
        tasks: dict[str, asyncio.Task[ActionResult | None]] = {}
        generation_of = {a.app: a.generation for a in plan.actions
                         if a.kind is not ActionKind.REMOVE}

        async def run(action: Action) -> ActionResult | None:
            for dep in action.depends_on:
                task = tasks.get(dep)
                # an earlier generation only: apps on a cycle (never in a valid tree) share one
                if task is not None and generation_of[dep] < action.generation:
                    done = await task
                    if done is None:  # never started: neither does its dependent
                        return None
            async with slots:
                if superseded is not None and superseded():
                    return None
                result = await self._run(action, desired.get(action.app), read_repo_file,
                                         plan.revision, failed)
            if result.outcome != "success":
                failed.add(action.app)
            return result

        order = [a for a in plan.actions if a.kind is not ActionKind.REMOVE]
        if first:
            order.sort(key=lambda a: a.app not in first)  # stable: plan order otherwise
        for action in order:
            tasks[action.app] = asyncio.create_task(run(action), name=f"do-{action.app}")
        try:
            done = await asyncio.gather(*tasks.values())
        finally:
            for task in tasks.values():  # a cancelled reconcile leaves nothing running
                task.cancel()
        by_app = {r.action.app: r for r in done if r is not None}
        results += [by_app[a.app] for a in plan.actions if a.app in by_app
                    and a.kind is not ActionKind.REMOVE]
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
                self._transition(
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
        return ActionResult(action, outcome, message, _ms(started))

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
        self._transition(spec.name, change, "app.blocked", version=spec.version,
                         outcome="skipped", message=reason)

    def _fail_unexpected(self, action: Action, spec: AppSpec | None, message: str) -> None:
        if self.store.get_app(action.app) is None:
            return
        self._transition(action.app, dict(phase="failed", message=message), "app.failed",
                         version=spec.version if spec else None, outcome="failure",
                         message=message)

    # -- start/stop one version ---------------------------------------------------------
    async def _install(self, spec: AppSpec, read_repo_file: ReadRepoFile | None) -> Path:
        try:
            return await asyncio.to_thread(self.artifacts.install, spec, read_repo_file)
        except ArtifactError as exc:
            raise ActionFailed(f"artifact refused: {exc}") from exc
        except SourceError as exc:
            raise ActionFailed(f"artifact fetch failed: {exc}", permanent=False) from exc
        except ReconcileError as exc:
            raise ActionFailed(str(exc)) from exc

    async def _start(
        self, spec: AppSpec, install_dir: Path, timeout: float | None = None, *,
        runtime_name: str | None = None,
    ) -> LaunchSpec | None:
        """Start `spec` from `install_dir` and wait until it is healthy (at most `timeout`,
        default its start_timeout); raises ActionFailed (after stopping what it started) when
        it is not. Under `runtime_name` (a start-first switch: `<app>@next`) the instance is
        not health-watched yet: _switch does that once it carries the app's name."""
        launch = self.launch_for(spec, install_dir)
        if launch is not None:
            if runtime_name is not None:
                launch = dataclasses.replace(launch, name=runtime_name, log_name=spec.name)
            try:
                await self.runtime.start(launch)
            except ReconcileError as exc:
                raise ActionFailed(f"start failed: {exc}") from exc
        await self._healthy_or_stop(spec, launch, timeout)
        if runtime_name is None:
            self.hooks.watch(spec, launch)
        return launch

    async def _healthy_or_stop(
        self, spec: AppSpec, launch: LaunchSpec | None, timeout: float | None,
    ) -> None:
        """Wait until the started (or adopted) `launch` is healthy; stop it and raise
        ActionFailed when it is not."""
        runtime_name = launch.name if launch is not None else spec.name
        ok, message = await self.hooks.wait_healthy(
            spec, launch, (lambda: self.is_alive(runtime_name)) if launch else (lambda: True),
            timeout,
        )
        if not ok:
            if launch is not None:
                await self.runtime.stop(runtime_name)
            raise ActionFailed(f"not healthy: {message}" if message else "not healthy")

    async def _stop(self, name: str) -> None:
        await self.hooks.unwatch(name)
        await self.runtime.stop(name)

    def _gc(self, name: str, keep: set[str | None]) -> None:
        try:
            self.artifacts.gc(name, {Path(p) for p in keep if p})
        except OSError as exc:  # leftovers cost disk, not correctness
            log.warning("%s: could not remove old versions: %s", name, exc)

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
        self._transition(spec.name, record)
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
            install_dir = await self._install(spec, read_repo_file)
        except ActionFailed as exc:
            self._transition(spec.name, record)
            return self._failed(spec, str(exc), exc.permanent, started)
        self._transition(
            spec.name, dataclasses.replace(record, install_dir=str(install_dir),
                                           applied_revision=revision,
                                           **_RUNNING),
            event, version=spec.version, outcome="success", duration_ms=_ms(started),
            from_version=from_version,
        )
        return "success", ""

    async def _bring_up(
        self, spec: AppSpec, read_repo_file: ReadRepoFile | None, revision: str,
        started: float, event: EventType, **event_fields: Any,
    ) -> tuple[Outcome, str]:
        """Install, start and wait healthy; then mark the app running and record `event`,
        in one transaction. A failure becomes the app's failed state (see _failed)."""
        try:
            install_dir = await self._install(spec, read_repo_file)
            self.store.update_app(spec.name, install_dir=str(install_dir))
            await self._start(spec, install_dir)
        except ActionFailed as exc:
            return self._failed(spec, str(exc), exc.permanent, started)
        self._transition(
            spec.name, _RUNNING | dict(applied_revision=revision), event,
            version=spec.version, outcome="success", duration_ms=_ms(started), **event_fields,
        )
        return "success", ""

    async def _restart(
        self, action: Action, spec: AppSpec, read_repo_file: ReadRepoFile | None,
        revision: str, started: float,
    ) -> tuple[Outcome, str]:
        """RESTART: the app should run this very (installed) spec but does not; start it again."""
        self._transition(spec.name, dict(phase="deploying", message="restarting: not running"))
        await self._stop(spec.name)  # a process in restart backoff: take over cleanly
        return await self._bring_up(spec, read_repo_file, revision, started, action.event,
                                    message="started again: it was not running")

    async def _replace(
        self, action: Action, spec: AppSpec, read_repo_file: ReadRepoFile | None,
        revision: str, started: float,
    ) -> tuple[Outcome, str]:
        """REPLACE: upgrade (new version) or reconfigure (same version, new spec) of a live
        installed version, rolled back to it when the new one does not come up healthy."""
        record = self.store.get_app(spec.name)
        if record is None or record.install_dir is None:  # the planner saw it installed
            raise RuntimeError(f"{spec.name}: planned as installed, but no install dir")
        upgrade = action.kind is ActionKind.UPGRADE
        old_version = record.version
        # install first: a bad artifact leaves the running version alone
        try:
            install_dir = await self._install(spec, read_repo_file)
        except ActionFailed as exc:
            message = f"{'upgrade to ' + spec.version if upgrade else 'reconfigure'} failed: " \
                      f"{exc}; still running {old_version}"
            self._transition(
                spec.name,
                dict(message=message, phase="running",
                     failed_version=spec.version if exc.permanent else None,
                     failed_spec_hash=spec.spec_hash() if exc.permanent else None),
                "app.failed", version=spec.version, from_version=old_version,
                outcome="failure", duration_ms=_ms(started), message=message,
            )
            return "failure", message
        # record where we come from FIRST, with the intent (from, to, health deadline): a
        # crash from here on is finished or rolled back by the next agent (resume). The old
        # process moves to prev_*; pid/create_time will name the new one.
        current = self.store.get_app(spec.name) or record
        start_first = (spec.upgrade.strategy == "start-first" and spec.run is not None
                       and self.is_alive(spec.name))
        old_run = self.store.spec_of(record).run
        now = time.time()
        stop_grace = 0.0 if start_first or old_run is None else old_run.stop_timeout
        intent = UpgradeIntent(
            from_version=old_version, to_version=spec.version,
            deadline=now + stop_grace + spec.health.start_timeout, started=now,
            strategy="start-first" if start_first else "stop-first", revision=revision,
            event=action.event,
        )
        self._transition(spec.name, dict(
            version=spec.version, spec_json=spec_to_json(spec),
            spec_hash=spec.spec_hash(), install_dir=str(install_dir),
            prev_version=record.version, prev_spec_json=record.spec_json,
            prev_dir=record.install_dir, phase="upgrading",
            message=f"{'upgrading' if upgrade else 'reconfiguring'} from {old_version}",
            prev_pid=current.pid, prev_pgid=current.pgid,
            prev_create_time=current.create_time, pid=None, pgid=None,
            create_time=None, proc_version=None, upgrade_intent=intent.to_json(),
        ))
        if start_first:
            return await self._switch(record, spec, install_dir, intent)
        await self._stop(spec.name)
        intent = dataclasses.replace(intent, deadline=time.time() + spec.health.start_timeout)
        self.store.update_app(spec.name, prev_pid=None, prev_pgid=None, prev_create_time=None,
                              upgrade_intent=intent.to_json())
        return await self._complete_replace(record, spec, install_dir, intent)

    async def _complete_replace(
        self, previous: AppRecord, spec: AppSpec, install_dir: Path, intent: UpgradeIntent,
        launch: LaunchSpec | None = None, timeout: float | None = None,
    ) -> tuple[Outcome, str]:
        """stop-first, the old version stopped: start the new one (or, resumed, wait for the
        adopted `launch`) until healthy, else roll back."""
        started = _monotonic_of(intent.started)
        try:
            if launch is None:
                await self._start(spec, install_dir, timeout)
            else:
                await self._healthy_or_stop(spec, launch, timeout)
                self.hooks.watch(spec, launch)
        except ActionFailed as exc:
            return await self._rollback(previous, spec, str(exc), started)
        return self._replaced(previous, spec, install_dir, intent)

    def _replaced(self, previous: AppRecord, spec: AppSpec, install_dir: Path,
                  intent: UpgradeIntent) -> tuple[Outcome, str]:
        self._transition(
            spec.name,
            _RUNNING | dict(applied_revision=intent.revision, prev_pid=None, prev_pgid=None,
                            prev_create_time=None),
            cast(EventType, intent.event), version=spec.version,
            from_version=previous.version, outcome="success",
            duration_ms=_ms(_monotonic_of(intent.started)),
        )
        self._gc(spec.name, {str(install_dir), previous.install_dir})
        return "success", ""

    async def _switch(
        self, previous: AppRecord, spec: AppSpec, install_dir: Path, intent: UpgradeIntent,
        launch: LaunchSpec | None = None, timeout: float | None = None,
    ) -> tuple[Outcome, str]:
        """start-first: the new version starts as `<app>@next` beside the old one (or, resumed,
        is adopted so); once healthy the old one is stopped and the new takes the app's name.
        When it is not healthy it is stopped and the old one never was."""
        name = spec.name
        started = _monotonic_of(intent.started)
        try:
            if launch is None:
                launch = await self._start(spec, install_dir, timeout,
                                           runtime_name=next_name(name))
            else:
                await self._healthy_or_stop(spec, launch, timeout)
        except ActionFailed as exc:
            if self.runtime.state(name) in ALIVE_STATES:
                return self._kept_old(previous, spec, str(exc), started)
            return await self._rollback(previous, spec, str(exc), started)
        await self._stop(name)  # the old version, now that the new one serves
        if launch is not None:
            self.runtime.rename(launch.name, name)
            self.hooks.watch(spec, dataclasses.replace(launch, name=name))
        return self._replaced(previous, spec, install_dir, intent)

    def _kept_old(self, previous: AppRecord, spec: AppSpec, reason: str,
                  started: float) -> tuple[Outcome, str]:
        """start-first, the new version failed beside the old one: the old one serves on,
        never stopped; this spec is not retried (like a rollback)."""
        record = self.store.get_app(spec.name)
        assert record is not None
        message = f"rolled back from {spec.version}: {reason}; {previous.version} kept running"
        self._transition(
            spec.name,
            dict(_serving(previous),
                 pid=record.prev_pid, pgid=record.prev_pgid,
                 create_time=record.prev_create_time, proc_version=previous.version,
                 prev_pid=None, prev_pgid=None, prev_create_time=None,
                 phase="running", message=message, upgrade_intent=None,
                 failed_spec_hash=spec.spec_hash(), failed_version=spec.version),
            "app.rolled-back", version=previous.version, from_version=spec.version,
            outcome="failure", duration_ms=_ms(started), message=message,
            data={"strategy": "start-first"},
        )
        return "failure", message

    async def resume(self, record: AppRecord, new_launch: LaunchSpec | None,
                     old_alive: bool) -> tuple[Outcome, str]:
        """Finish or undo a replace that an agent crash cut short (Recovery, at start), as
        the crashed agent would have: the health wait goes on with the time its intent left
        (at least one probe); healthy -> recorded as that agent would (app.upgraded, ...),
        not healthy or gone -> rolled back (app.rolled-back / app.failed, not retried).
        `new_launch`: the new version's adopted process (start-first: as `<app>@next`);
        `old_alive`: the old version's process was adopted under the app's name."""
        intent = record.intent
        if intent is None or record.install_dir is None or record.prev_spec_json is None:
            raise RuntimeError(f"{record.name}: no upgrade intent to resume")
        spec = self.store.spec_of(record)
        previous = previous_of(record)
        install_dir = Path(record.install_dir)
        timeout = max(intent.deadline - time.time(), min(spec.health.timeout, 1.0))
        # the new process was started (on_started recorded it) but is gone now
        died = new_launch is None and record.pid is not None \
            and record.proc_version == spec.version
        reason = "not healthy: the new version exited while the agent was down"
        if intent.strategy == "start-first":
            if died:
                if old_alive:
                    return self._kept_old(previous, spec, reason, _monotonic_of(intent.started))
                return await self._rollback(previous, spec, reason,
                                            _monotonic_of(intent.started))
            return await self._switch(previous, spec, install_dir, intent, new_launch, timeout)
        if died:
            return await self._rollback(previous, spec, reason, _monotonic_of(intent.started))
        if old_alive:  # cut short before the old version was stopped
            await self._stop(spec.name)
        return await self._complete_replace(previous, spec, install_dir, intent, new_launch,
                                            timeout)

    async def _rollback(
        self, previous: AppRecord, spec: AppSpec, reason: str, started: float,
    ) -> tuple[Outcome, str]:
        failed_hash = spec.spec_hash()
        if not spec.upgrade.rollback or previous.install_dir is None:
            return self._failed(spec, reason, True, started)
        prev_spec = previous.spec
        # the new process is stopped; pid/create_time will name the previous version's
        self._transition(spec.name, dict(
            phase="rolling-back", message=f"rolling back to {previous.version}: {reason}",
            pid=None, pgid=None, create_time=None, proc_version=None,
        ))
        try:
            await self._start(prev_spec, Path(previous.install_dir))
        except ActionFailed as exc:
            return self._failed(spec, f"{reason}; rollback to {previous.version} failed: {exc}",
                                True, started)
        message = f"rolled back from {spec.version}: {reason}"
        # the app serves its previous version again; this spec is not retried. The process
        # fields stay as the runtime listener recorded them for the new start.
        self._transition(
            spec.name,
            dict(_serving(previous),
                 phase="running", health="healthy", message=message, upgrade_intent=None,
                 failed_spec_hash=failed_hash, failed_version=spec.version),
            "app.rolled-back", version=previous.version, from_version=spec.version,
            outcome="failure", duration_ms=_ms(started), message=message,
        )
        return "failure", message

    def _failed(self, spec: AppSpec, message: str, permanent: bool,
                started: float) -> tuple[Outcome, str]:
        self._transition(
            spec.name,
            dict(phase="failed", health="unknown", message=message, upgrade_intent=None,
                 failed_spec_hash=spec.spec_hash() if permanent else None),
            "app.failed", version=spec.version, outcome="failure", duration_ms=_ms(started),
            message=message,
        )
        return "failure", message

    async def _remove(self, action: Action, started: float) -> tuple[Outcome, str]:
        """REMOVE: stop the app, delete its files, then its record."""
        record = self.store.get_app(action.app)
        if record is None:
            return "success", ""
        self._transition(action.app, dict(phase="removing", message=action.reason))
        await self._stop(action.app)
        try:
            await asyncio.to_thread(self.artifacts.remove_app, action.app)
        except OSError as exc:
            log.warning("%s: could not remove its files: %s", action.app, exc)
        self._transition(action.app, None, action.event, version=record.version,
                         outcome="success", duration_ms=_ms(started), message=action.reason)
        return "success", ""

    async def stop_all(self, order: list[list[str]]) -> None:
        """Stop every app, group by group (dependents first), for --stop-apps-on-exit."""
        for group in order:
            await asyncio.gather(*(self._stop(name) for name in group))


# A new version (or spec) that came up healthy: it is what runs now, and no failure is left.
_RUNNING: dict[str, Any] = dict(
    phase="running", health="healthy", message="", failed_spec_hash=None, failed_version=None,
    upgrade_intent=None,
)


def next_name(app: str) -> str:
    """The runtime name of a start-first upgrade's new instance while the old one runs."""
    return f"{app}{NEXT_SUFFIX}"


def previous_of(record: AppRecord) -> AppRecord:
    """The version an upgrading record comes from, as a record (what a rollback restores)."""
    assert record.prev_version is not None and record.prev_spec_json is not None
    prev_spec = record.prev_spec
    assert prev_spec is not None
    return AppRecord(name=record.name, version=record.prev_version,
                     spec_json=record.prev_spec_json, spec_hash=prev_spec.spec_hash(),
                     install_dir=record.prev_dir)


def _monotonic_of(epoch: float) -> float:
    """time.monotonic() at the wall-clock moment `epoch` (durations across agent restarts)."""
    return time.monotonic() - max(0.0, time.time() - epoch)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _serving(previous: AppRecord) -> dict[str, Any]:
    """The record fields of an app that serves its `previous` version again (after a
    rollback of either strategy): that version's spec and files, nothing to roll back to."""
    return dict(version=previous.version, spec_json=previous.spec_json,
                spec_hash=previous.spec_hash, install_dir=previous.install_dir,
                prev_version=None, prev_spec_json=None, prev_dir=None)
