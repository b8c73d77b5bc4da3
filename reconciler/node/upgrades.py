"""Upgrades: replacing a live version crash-safely (an upgrade intent first), rollback if sick."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, cast

from reconciler.core.plan import Action, ActionKind
from reconciler.core.spec import AppSpec
from reconciler.core.states import EventType, Outcome
from reconciler.node.app_changes import RUNNING, AppChanges, ms_since
from reconciler.node.instances import ActionFailed, HealthHooks, Instances, ReadRepoFile, next_name
from reconciler.node.runtimes.base import ALIVE_STATES, LaunchSpec, Runtime
from reconciler.node.store import AppRecord, Store, UpgradeIntent, spec_to_json


class Upgrades:
    """The REPLACE step (an upgrade or a reconfigure of a live installed version) and its
    resumption after an agent crash. The intent (from, to, health deadline) is recorded
    before the old process is touched, so the next agent can finish or undo it; a new
    version that does not come up healthy is rolled back to the previous one."""

    def __init__(self, *, store: Store, runtime: Runtime, instances: Instances,
                 hooks: HealthHooks, changes: AppChanges) -> None:
        self.store = store
        self.runtime = runtime
        self.instances = instances
        self.hooks = hooks
        self.changes = changes

    async def replace(
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
            install_dir = await self.instances.install(spec, read_repo_file)
        except ActionFailed as exc:
            message = f"{'upgrade to ' + spec.version if upgrade else 'reconfigure'} failed: " \
                      f"{exc}; still running {old_version}"
            self.changes.transition(
                spec.name,
                dict(message=message, phase="running",
                     failed_version=spec.version if exc.permanent else None,
                     failed_spec_hash=spec.spec_hash() if exc.permanent else None),
                "app.failed", version=spec.version, from_version=old_version,
                outcome="failure", duration_ms=ms_since(started), message=message,
            )
            return "failure", message
        # record where we come from FIRST, with the intent (from, to, health deadline): a
        # crash from here on is finished or rolled back by the next agent (resume). The old
        # process moves to prev_*; pid/create_time will name the new one.
        current = self.store.get_app(spec.name) or record
        start_first = (spec.upgrade.strategy == "start-first" and spec.run is not None
                       and self.instances.is_alive(spec.name))
        old_run = self.store.spec_of(record).run
        now = time.time()
        stop_grace = 0.0 if start_first or old_run is None else old_run.stop_timeout
        intent = UpgradeIntent(
            from_version=old_version, to_version=spec.version,
            deadline=now + stop_grace + spec.health.start_timeout, started=now,
            strategy="start-first" if start_first else "stop-first", revision=revision,
            event=action.event,
        )
        self.changes.transition(spec.name, dict(
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
        await self.instances.stop(spec.name)
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
                await self.instances.start(spec, install_dir, timeout)
            else:
                await self.instances.healthy_or_stop(spec, launch, timeout)
                self.hooks.watch(spec, launch)
        except ActionFailed as exc:
            return await self._rollback(previous, spec, str(exc), started)
        return self._replaced(previous, spec, install_dir, intent)

    def _replaced(self, previous: AppRecord, spec: AppSpec, install_dir: Path,
                  intent: UpgradeIntent) -> tuple[Outcome, str]:
        self.changes.transition(
            spec.name,
            RUNNING | dict(applied_revision=intent.revision, prev_pid=None, prev_pgid=None,
                           prev_create_time=None),
            cast(EventType, intent.event), version=spec.version,
            from_version=previous.version, outcome="success",
            duration_ms=ms_since(_monotonic_of(intent.started)),
        )
        self.instances.gc(spec.name, {str(install_dir), previous.install_dir})
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
                launch = await self.instances.start(spec, install_dir, timeout,
                                                    runtime_name=next_name(name))
            else:
                await self.instances.healthy_or_stop(spec, launch, timeout)
        except ActionFailed as exc:
            if self.runtime.state(name) in ALIVE_STATES:
                return self._kept_old(previous, spec, str(exc), started)
            return await self._rollback(previous, spec, str(exc), started)
        await self.instances.stop(name)  # the old version, now that the new one serves
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
        self.changes.transition(
            spec.name,
            dict(_serving(previous),
                 pid=record.prev_pid, pgid=record.prev_pgid,
                 create_time=record.prev_create_time, proc_version=previous.version,
                 prev_pid=None, prev_pgid=None, prev_create_time=None,
                 phase="running", message=message, upgrade_intent=None,
                 failed_spec_hash=spec.spec_hash(), failed_version=spec.version),
            "app.rolled-back", version=previous.version, from_version=spec.version,
            outcome="failure", duration_ms=ms_since(started), message=message,
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
            await self.instances.stop(spec.name)
        return await self._complete_replace(previous, spec, install_dir, intent, new_launch,
                                            timeout)

    async def _rollback(
        self, previous: AppRecord, spec: AppSpec, reason: str, started: float,
    ) -> tuple[Outcome, str]:
        failed_hash = spec.spec_hash()
        if not spec.upgrade.rollback or previous.install_dir is None:
            return self.changes.failed(spec, reason, True, started)
        prev_spec = previous.spec
        # the new process is stopped; pid/create_time will name the previous version's
        self.changes.transition(spec.name, dict(
            phase="rolling-back", message=f"rolling back to {previous.version}: {reason}",
            pid=None, pgid=None, create_time=None, proc_version=None,
        ))
        try:
            await self.instances.start(prev_spec, Path(previous.install_dir))
        except ActionFailed as exc:
            return self.changes.failed(
                spec, f"{reason}; rollback to {previous.version} failed: {exc}", True, started)
        message = f"rolled back from {spec.version}: {reason}"
        # the app serves its previous version again; this spec is not retried. The process
        # fields stay as the runtime listener recorded them for the new start.
        self.changes.transition(
            spec.name,
            dict(_serving(previous),
                 phase="running", health="healthy", message=message, upgrade_intent=None,
                 failed_spec_hash=failed_hash, failed_version=spec.version),
            "app.rolled-back", version=previous.version, from_version=spec.version,
            outcome="failure", duration_ms=ms_since(started), message=message,
        )
        return "failure", message


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


def _serving(previous: AppRecord) -> dict[str, Any]:
    """The record fields of an app that serves its `previous` version again (after a
    rollback of either strategy): that version's spec and files, nothing to roll back to."""
    return dict(version=previous.version, spec_json=previous.spec_json,
                spec_hash=previous.spec_hash, install_dir=previous.install_dir,
                prev_version=None, prev_spec_json=None, prev_dir=None)
