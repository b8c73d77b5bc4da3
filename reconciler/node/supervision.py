"""Supervision: the runtime's and the health monitor's callbacks, and the executor's health hooks.

Implements runtimes.RuntimeListener (a process started, exited, crash-looped) and the health
side of executor.Hooks (watch, unwatch, wait until healthy, is a dependency usable?). It keeps
the two facts only the callbacks know: which supervised apps are down for good, and which
finished as their restart policy allows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from reconciler.core.events import Event
from reconciler.core.spec import AppSpec
from reconciler.core.states import STUCK_PHASES
from reconciler.node.health import HealthMonitor, wait_healthy
from reconciler.node.runtimes.base import (
    ALIVE_STATES,
    NEXT_SUFFIX,
    LaunchSpec,
    ProcessRecord,
    Runtime,
)
from reconciler.node.store import AppRecord, Store
from reconciler.node.transitions import transition

log = logging.getLogger(__name__)

Record = Callable[..., Event]


class Supervision:
    def __init__(
        self, store: Store, record: Record, notify: Callable[[], None], *,
        workdir: Path, port_offset: int,
    ) -> None:
        self.store = store
        self.record = record
        self._notify = notify
        self._workdir = workdir
        self._port_offset = port_offset
        self.monitor = HealthMonitor(self._on_health_change)
        self.runtime: Runtime | None = None  # attached once built (it needs us as listener)
        self.closed = False
        self.down: set[str] = set()  # supervised apps that exited for good / crash-looped
        self.completed: set[str] = set()  # exited 0 under a never/on-failure policy

    def attach(self, runtime: Runtime) -> None:
        self.runtime = runtime

    # -- facts ------------------------------------------------------------------------------
    def is_running(self, record: AppRecord, names: set[str] | None = None) -> bool:
        """Running or in restart backoff. The runtime knows every app it supervises (a stop
        forgets it); the listener callbacks tell which of those exited for good. Cheaper
        than runtime.stats(), which reads cpu and memory."""
        if self.store.spec_of(record).run is None:
            return record.install_dir is not None and record.phase == "running"
        if names is None:
            assert self.runtime is not None
            names = self.runtime.names()
        return record.name in names and record.name not in self.down

    def alive(self, name: str, state: str | None) -> bool:
        """For status: the process runs, restarts in backoff, or finished as its policy
        allows; `state` is the runtime's ProcState (None: not supervised)."""
        if name in self.down:
            return False
        return state in ALIVE_STATES or name in self.completed

    # -- RuntimeListener ------------------------------------------------------------------
    def on_started(self, record: ProcessRecord, restarted: bool) -> None:
        self.down.discard(record.name)
        self.completed.discard(record.name)
        name, slot = record.name, "pid"
        if name.endswith(NEXT_SUFFIX):  # a start-first upgrade's new instance: the app's pid
            name = name.removesuffix(NEXT_SUFFIX)
        app = None if self.closed else self.store.get_app(name)
        if app is None:
            return
        intent = app.intent
        if name == record.name and app.phase == "upgrading" and intent is not None \
                and intent.strategy == "start-first":
            slot = "prev_pid"  # the old version restarted beside the new one: still prev
        with self.store.transaction():
            if slot == "pid":
                self.store.set_process(name, replace(record, name=name))
            else:
                self.store.update_app(name, prev_pid=record.pid, prev_pgid=record.pgid,
                                      prev_create_time=record.create_time)
            if restarted:
                app = self.store.get_app(name)
                assert app is not None
                transition(self.store, self.record, name,
                           {"restarts": app.restarts + 1}, "app.restarted",
                           version=record.version,
                           message="restarted by the supervisor after it exited")
        self._notify()

    def on_exited(self, name: str, returncode: int | None, restart_in: float | None) -> None:
        record = None if self.closed else self.store.get_app(name)
        if restart_in is None and record is not None:
            policy = self.store.spec_of(record).restart.policy
            if returncode == 0 and policy != "always":
                # a job that finished: its policy says leave it, so no drift to heal
                self.completed.add(name)
                with self.store.transaction():
                    self.store.update_app(name, message=f"exited with code 0 (restart policy "
                                                        f"{policy}: not restarted)")
            else:
                self.down.add(name)
        when = f"restart in {restart_in:.1f}s" if restart_in is not None else "not restarted"
        log.info("%s exited (code %s), %s", name, returncode, when)
        self._notify()

    def on_crash_loop(self, name: str, message: str) -> None:
        self.down.add(name)
        app = None if self.closed else self.store.get_app(name)
        if app is None:
            return
        asyncio.get_running_loop().create_task(self.monitor.stop(name))
        transition(self.store, self.record, name,
                   dict(phase="failed", health="unhealthy", message=message,
                        failed_spec_hash=app.spec_hash, pid=None, pgid=None, create_time=None,
                        proc_version=None),
                   "app.failed", version=app.version, outcome="failure", message=message)
        self._block_dependents(name, f"dependency {name} failed: {message}")
        self._notify()

    def _block_dependents(self, failed: str, reason: str) -> None:
        """The running apps that depend on `failed` (directly or not) are kept running but
        marked blocked: status must not call them fine while what they need is down. The
        next reconcile that finds the dependency healthy again restarts them after it."""
        records = self.store.apps()
        users: dict[str, list[str]] = {}
        for record in records.values():
            for dep in record.depends_on:
                users.setdefault(dep, []).append(record.name)
        todo, seen = list(users.get(failed, ())), {failed}
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            todo += users.get(name, ())
            record = records[name]
            if record.phase != "running":
                continue
            transition(self.store, self.record, name,
                       dict(phase="blocked", message=f"{reason}; kept running"),
                       "app.blocked", version=record.version, outcome="skipped",
                       message=f"{reason}; kept running")

    # -- executor.Hooks (health) ------------------------------------------------------------
    def watch(self, spec: AppSpec, launch: LaunchSpec | None, healthy: bool = True) -> None:
        if spec.health.probe_kind is None:
            return
        self.monitor.start(
            spec.name, spec.health, cwd=launch.workdir if launch else self._workdir,
            env=launch.env if launch else {}, port_offset=self._port_offset,
            initial="healthy" if healthy else "unknown",
        )

    async def unwatch(self, name: str) -> None:
        await self.monitor.stop(name)

    async def wait_healthy(
        self, spec: AppSpec, launch: LaunchSpec | None, is_alive: Callable[[], bool],
        timeout: float | None = None,
    ) -> tuple[bool, str]:
        result = await wait_healthy(
            spec.health, cwd=launch.workdir if launch else self._workdir,
            env=launch.env if launch else {}, port_offset=self._port_offset,
            is_alive=is_alive, timeout=spec.health.start_timeout if timeout is None else timeout,
        )
        return result.ok, result.message

    async def dependency_problem(self, name: str) -> str | None:
        record = self.store.get_app(name)
        if record is None:
            return "not installed"
        if record.phase in STUCK_PHASES:
            return record.phase
        if not self.is_running(record):
            return "not running"
        if self.runtime is not None and self.runtime.state(name) == "backoff":
            # exited and waiting to be restarted: down now, whatever its last probe said
            return "restarting (in restart backoff)"
        if record.health == "healthy":
            return None
        # unknown (just adopted) or unhealthy: ask the probe now rather than trust old news
        if self.store.spec_of(record).health.probe_kind is None:
            return None
        if name not in self.monitor.apps():
            return f"{record.health} health"
        result = await self.monitor.probe_now(name)
        return None if result.ok else f"not healthy: {result.message}"

    def _on_health_change(self, app: str, old: str, new: str, result: Any) -> None:
        record = None if self.closed else self.store.get_app(app)
        if record is None or record.health == new:
            return
        transition(self.store, self.record, app, {"health": new}, "app.health-changed",
                   version=record.version,
                   message=f"{old} -> {new}: {getattr(result, 'message', '')}".strip(": "),
                   data={"from": old, "to": new})
        self._notify()
