"""Executor: applies a Plan (removals, then generations in parallel), health gates, rollback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reconciler.errors import ArtifactError, ReconcileError, SourceError
from reconciler.events import Event
from reconciler.plan import Action, ActionKind, Plan
from reconciler.runtimes.base import LaunchSpec, RestartPolicy, Runtime
from reconciler.spec import METADATA_FIELDS, AppSpec
from reconciler.store import AppRecord, Store, spec_to_json

log = logging.getLogger(__name__)

ReadRepoFile = Callable[[str], bytes]


class Artifacts(Protocol):
    """What the executor needs from reconciler.artifacts.ArtifactStore."""

    def install(self, spec: AppSpec, read_repo_file: ReadRepoFile | None = None) -> Path: ...

    def gc(self, name: str, keep: set[Path]) -> list[Path]: ...

    def remove_app(self, name: str) -> None: ...


class Hooks(Protocol):
    """The agent's side of the executor: events, health watching, health probes."""

    def record(self, type: str, **fields: Any) -> Event:
        """Queue an event in the store (inside the caller's transaction)."""

    def watch(self, spec: AppSpec, launch: LaunchSpec | None) -> None:
        """Start periodic health probing of a running app."""

    async def unwatch(self, name: str) -> None: ...

    async def wait_healthy(
        self, spec: AppSpec, launch: LaunchSpec | None, is_alive: Callable[[], bool]
    ) -> tuple[bool, str]:
        """Probe until healthy, dead or the start timeout: (ok, message)."""

    async def dependency_problem(self, name: str) -> str | None:
        """None when app `name` runs and is healthy, else why not."""


@dataclass(frozen=True)
class ActionResult:
    """What one action came to: failure is a value, not an exception."""

    action: Action
    outcome: str  # success | failure | skipped (blocked)
    message: str = ""
    duration_ms: float = 0.0


class ActionFailed(Exception):
    """An app step failed; `permanent` is False for errors worth retrying (source hiccups)."""

    def __init__(self, message: str, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped, optional `export `, quotes
    stripped). Errors name the file and line, never a value."""
    env: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise ActionFailed(f"env file {path}: {exc.strerror or exc}") from exc
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ActionFailed(f"env file {path}:{lineno}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key] = value
    return env


class Executor:
    """Applies plans for one node. Every state change and its event are one store transaction;
    processes go through the Runtime; artifacts install in a thread."""

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
        stats = self.runtime.stats(name)
        return stats is not None and stats.state == "running"

    # -- plan -----------------------------------------------------------------------------
    async def apply(
        self, plan: Plan, desired: Mapping[str, AppSpec], read_repo_file: ReadRepoFile | None,
    ) -> list[ActionResult]:
        """Removals first (dependents first), then each generation's actions in parallel. An
        action whose dependency failed in this run is blocked; independent apps go on."""
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
        for group in plan.generations():
            group_results = await asyncio.gather(
                *(self._run(a, desired.get(a.app), read_repo_file, plan.revision, failed)
                  for a in group)
            )
            failed |= {r.action.app for r in group_results if r.outcome != "success"}
            results += group_results
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
                self.store.update_app(name, spec_json=spec_to_json(spec),
                                      spec_hash=spec.spec_hash())
                self.hooks.record(
                    "app.reconfigured", app=name, version=spec.version,
                    from_version=record.version, outcome="success",
                    message=f"{', '.join(changed)} changed; not restarted",
                    data={"restart": False, "changed": changed},
                )

    async def _run(
        self, action: Action, spec: AppSpec | None, read_repo_file: ReadRepoFile | None,
        revision: str, failed: set[str],
    ) -> ActionResult:
        started = time.monotonic()
        span = (self.telemetry.span("action", kind=action.kind.value, app=action.app)
                if self.telemetry else contextlib.nullcontext())
        with span as current:
            try:
                if action.kind is ActionKind.REMOVE:
                    outcome, message = await self._remove(action, revision, started)
                elif spec is None:
                    outcome, message = "failure", "no desired spec for this app"
                elif problem := await self._dependency_problem(spec, failed):
                    outcome, message = "skipped", problem
                    self._blocked(spec, revision, problem)
                else:
                    outcome, message = await self._change(
                        action, spec, read_repo_file, revision, started
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

    async def _dependency_problem(self, spec: AppSpec, failed: set[str]) -> str | None:
        for dep in spec.depends_on:
            if dep in failed:
                return f"dependency {dep} failed"
            problem = await self.hooks.dependency_problem(dep)
            if problem:
                return f"dependency {dep} failed: {problem}"
        return None

    def _blocked(self, spec: AppSpec, revision: str, reason: str) -> None:
        record = self.store.get_app(spec.name)
        if record is not None and record.phase == "blocked" and record.message == reason:
            return  # still blocked for the same reason: said so already
        with self.store.transaction():
            if record is None:
                self.store.put_app(AppRecord(
                    name=spec.name, version=spec.version, spec_json=spec_to_json(spec),
                    spec_hash=spec.spec_hash(), phase="blocked", message=reason,
                    attempted_revision=revision,
                ))
            else:
                # an installed app keeps running what it runs; it is just not changed
                self.store.update_app(spec.name, phase="blocked", message=reason,
                                      attempted_revision=revision)
            self.hooks.record("app.blocked", app=spec.name, version=spec.version,
                              outcome="skipped", message=reason)

    def _fail_unexpected(self, action: Action, spec: AppSpec | None, message: str) -> None:
        if self.store.get_app(action.app) is None:
            return
        with self.store.transaction():
            self.store.update_app(action.app, phase="failed", message=message)
            self.hooks.record("app.failed", app=action.app,
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

    async def _start(self, spec: AppSpec, install_dir: Path) -> LaunchSpec | None:
        """Start `spec` from `install_dir` and wait until it is healthy; raises ActionFailed
        (after stopping what it started) when it is not."""
        launch = self.launch_for(spec, install_dir)
        if launch is not None:
            try:
                await self.runtime.start(launch)
            except ReconcileError as exc:
                raise ActionFailed(f"start failed: {exc}") from exc
        ok, message = await self.hooks.wait_healthy(
            spec, launch, (lambda: self.is_alive(spec.name)) if launch else (lambda: True)
        )
        if not ok:
            if launch is not None:
                await self.runtime.stop(spec.name)
            raise ActionFailed(f"not healthy: {message}" if message else "not healthy")
        self.hooks.watch(spec, launch)
        return launch

    async def _stop(self, name: str) -> None:
        await self.hooks.unwatch(name)
        await self.runtime.stop(name)

    def _gc(self, name: str, keep: set[str | None]) -> None:
        try:
            self.artifacts.gc(name, {Path(p) for p in keep if p})
        except OSError as exc:  # leftovers cost disk, not correctness
            log.warning("%s: could not remove old versions: %s", name, exc)

    # -- actions --------------------------------------------------------------------------
    async def _change(
        self, action: Action, spec: AppSpec, read_repo_file: ReadRepoFile | None,
        revision: str, started: float,
    ) -> tuple[str, str]:
        record = self.store.get_app(spec.name)
        stats = self.runtime.stats(spec.name)
        alive = stats is not None and stats.state in ("running", "backoff")
        same_spec = record is not None and record.spec_hash == spec.spec_hash()
        if record is not None and record.install_dir is not None and same_spec:
            return await self._restart(record, spec, read_repo_file, revision, started)
        if record is not None and record.install_dir is not None and alive:
            return await self._replace(action, record, spec, read_repo_file, revision, started)
        # nothing (healthy) to upgrade from or roll back to: a fresh deploy of this spec
        event, from_version = "app.deployed", None
        if record is not None and record.install_dir is not None:
            from_version = record.version
            event = "app.upgraded" if record.version != spec.version else "app.reconfigured"
        return await self._deploy(spec, read_repo_file, revision, started, event, from_version)

    async def _deploy(
        self, spec: AppSpec, read_repo_file: ReadRepoFile | None, revision: str,
        started: float, event: str = "app.deployed", from_version: str | None = None,
    ) -> tuple[str, str]:
        with self.store.transaction():
            self.store.put_app(AppRecord(
                name=spec.name, version=spec.version, spec_json=spec_to_json(spec),
                spec_hash=spec.spec_hash(), phase="deploying", attempted_revision=revision,
                suspended=False,
            ))
        return await self._bring_up(spec, read_repo_file, revision, started, event,
                                    from_version=from_version)

    async def _bring_up(
        self, spec: AppSpec, read_repo_file: ReadRepoFile | None, revision: str,
        started: float, event: str, **event_fields: Any,
    ) -> tuple[str, str]:
        """Install, start and wait healthy; then mark the app running and record `event`,
        in one transaction. A failure becomes the app's failed state (see _failed)."""
        try:
            install_dir = await self._install(spec, read_repo_file)
            self.store.update_app(spec.name, install_dir=str(install_dir))
            await self._start(spec, install_dir)
        except ActionFailed as exc:
            return self._failed(spec, str(exc), exc.permanent, started)
        with self.store.transaction():
            self.store.update_app(
                spec.name, phase="running", health="healthy", message="",
                applied_revision=revision, failed_spec_hash=None, failed_version=None,
            )
            self.hooks.record(event, app=spec.name, version=spec.version, outcome="success",
                              duration_ms=_ms(started), **event_fields)
        return "success", ""

    async def _restart(
        self, record: AppRecord, spec: AppSpec, read_repo_file: ReadRepoFile | None,
        revision: str, started: float,
    ) -> tuple[str, str]:
        """Drift: the app should run this very spec but does not; start it again."""
        with self.store.transaction():
            self.store.update_app(spec.name, phase="deploying", attempted_revision=revision,
                                  message="restarting: not running")
        await self._stop(spec.name)  # a process in restart backoff: take over cleanly
        return await self._bring_up(spec, read_repo_file, revision, started, "app.restarted",
                                    message="started again: it was not running")

    async def _replace(
        self, action: Action, record: AppRecord, spec: AppSpec,
        read_repo_file: ReadRepoFile | None, revision: str, started: float,
    ) -> tuple[str, str]:
        """Upgrade (new version) or reconfigure (same version, new spec), with rollback."""
        upgrade = record.version != spec.version
        kind = "app.upgraded" if upgrade else "app.reconfigured"
        old_version = record.version
        # install first: a bad artifact leaves the running version alone
        try:
            install_dir = await self._install(spec, read_repo_file)
        except ActionFailed as exc:
            message = f"{'upgrade to ' + spec.version if upgrade else 'reconfigure'} failed: " \
                      f"{exc}; still running {old_version}"
            with self.store.transaction():
                self.store.update_app(
                    spec.name, message=message, attempted_revision=revision,
                    phase="running" if record.install_dir else "failed",
                    failed_version=spec.version if exc.permanent else None,
                    failed_spec_hash=spec.spec_hash() if exc.permanent else None,
                )
                self.hooks.record("app.failed", app=spec.name, version=spec.version,
                                  from_version=old_version, outcome="failure",
                                  duration_ms=_ms(started), message=message)
            return "failure", message
        # record where we come from FIRST: a crash from here on can be resumed or undone.
        # The old process moves to prev_*; pid/create_time will name the new one.
        with self.store.transaction():
            current = self.store.get_app(spec.name) or record
            self.store.update_app(
                spec.name, version=spec.version, spec_json=spec_to_json(spec),
                spec_hash=spec.spec_hash(), install_dir=str(install_dir),
                prev_version=record.version, prev_spec_json=record.spec_json,
                prev_dir=record.install_dir, phase="upgrading", attempted_revision=revision,
                message=f"{'upgrading' if upgrade else 'reconfiguring'} from {old_version}",
                prev_pid=current.pid, prev_pgid=current.pgid,
                prev_create_time=current.create_time, pid=None, pgid=None,
                create_time=None, proc_version=None,
            )
        await self._stop(spec.name)
        self.store.update_app(spec.name, prev_pid=None, prev_pgid=None, prev_create_time=None)
        try:
            await self._start(spec, install_dir)
        except ActionFailed as exc:
            return await self._rollback(record, spec, str(exc), revision, started)
        with self.store.transaction():
            self.store.update_app(
                spec.name, phase="running", health="healthy", message="",
                applied_revision=revision, failed_spec_hash=None, failed_version=None,
            )
            self.hooks.record(kind, app=spec.name, version=spec.version,
                              from_version=old_version, outcome="success",
                              duration_ms=_ms(started))
        self._gc(spec.name, {str(install_dir), record.install_dir})
        return "success", ""

    async def _rollback(
        self, previous: AppRecord, spec: AppSpec, reason: str, revision: str, started: float,
    ) -> tuple[str, str]:
        failed_hash = spec.spec_hash()
        if not spec.upgrade.rollback or previous.install_dir is None:
            return self._failed(spec, reason, True, started)
        prev_spec = previous.spec
        with self.store.transaction():
            # the new process is stopped; pid/create_time will name the previous version's
            self.store.update_app(spec.name, phase="rolling-back",
                                  message=f"rolling back to {previous.version}: {reason}",
                                  pid=None, pgid=None, create_time=None, proc_version=None)
        try:
            await self._start(prev_spec, Path(previous.install_dir))
        except ActionFailed as exc:
            return self._failed(spec, f"{reason}; rollback to {previous.version} failed: {exc}",
                                True, started)
        message = f"rolled back from {spec.version}: {reason}"
        with self.store.transaction():
            # the app serves its previous version again; this spec is not retried. The
            # process fields stay as the runtime listener recorded them for the new start.
            self.store.update_app(
                spec.name, version=previous.version, spec_json=previous.spec_json,
                spec_hash=previous.spec_hash, install_dir=previous.install_dir,
                prev_version=None, prev_spec_json=None, prev_dir=None,
                phase="running", health="healthy", message=message,
                failed_spec_hash=failed_hash, failed_version=spec.version,
                attempted_revision=revision,
            )
            self.hooks.record("app.rolled-back", app=spec.name, version=previous.version,
                              from_version=spec.version, outcome="failure",
                              duration_ms=_ms(started), message=message)
        return "failure", message

    def _failed(self, spec: AppSpec, message: str, permanent: bool,
                started: float) -> tuple[str, str]:
        with self.store.transaction():
            self.store.update_app(
                spec.name, phase="failed", health="unknown", message=message,
                failed_spec_hash=spec.spec_hash() if permanent else None,
            )
            self.hooks.record("app.failed", app=spec.name, version=spec.version,
                              outcome="failure", duration_ms=_ms(started), message=message)
        return "failure", message

    async def _remove(self, action: Action, revision: str, started: float) -> tuple[str, str]:
        record = self.store.get_app(action.app)
        if record is None:
            return "success", ""
        with self.store.transaction():
            self.store.update_app(action.app, phase="removing", message=action.reason)
        await self._stop(action.app)
        try:
            await asyncio.to_thread(self.artifacts.remove_app, action.app)
        except OSError as exc:
            log.warning("%s: could not remove its files: %s", action.app, exc)
        with self.store.transaction():
            self.store.delete_app(action.app)
            self.hooks.record("app.removed", app=action.app, version=record.version,
                              outcome="success", duration_ms=_ms(started),
                              message=action.reason)
        return "success", ""

    async def stop_all(self, order: list[list[str]]) -> None:
        """Stop every app, group by group (dependents first), for --stop-apps-on-exit."""
        for group in order:
            await asyncio.gather(*(self._stop(name) for name in group))


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
