"""Recovery at agent start: adopt what a previous agent left running, finish or undo the change
it was making, and stop app processes that no record owns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from reconciler.core.spec import AppSpec
from reconciler.node.executor import Executor
from reconciler.node.instances import ActionFailed, next_name
from reconciler.node.runtimes.base import LaunchSpec, ProcessRecord, Runtime
from reconciler.node.runtimes.process import (
    INSTANCE_ENV,
    instance_of,
    kill_group,
    stop_recorded,
)
from reconciler.node.store import AppRecord, Store

log = logging.getLogger(__name__)

Watch = Callable[..., None]


class Recovery:
    def __init__(
        self, *, node_id: str, store: Store, runtime: Runtime, executor: Executor,
        watch: Watch, apps_root: Path | None,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.runtime = runtime
        self.executor = executor
        self.watch = watch
        self.apps_root = apps_root
        # interrupted upgrades being finished or rolled back (Executor.resume)
        self._resuming: asyncio.Future[list[Any]] | None = None

    async def adopt_all(self) -> None:
        """Take over processes a previous agent left; finish or undo interrupted changes.
        Upgrades cut short in their health wait go on in the background (see settled)."""
        adopted: set[int] = set()
        resumes: list[Coroutine[Any, Any, Any]] = []
        for name, record in self.store.apps().items():
            try:
                if record.phase == "upgrading" and record.intent is not None:
                    adopted |= self._adopt_upgrading(record, resumes)
                    continue
                pid = await self._adopt(record)
            except Exception:
                log.exception("%s: adoption failed", name)
                pid = None
            if pid:
                adopted.add(pid)
        await asyncio.to_thread(self._sweep_orphans, adopted)
        if resumes:
            self._resuming = asyncio.gather(*(self._resume(c) for c in resumes))

    async def settled(self) -> None:
        """Until the interrupted upgrades found at start are finished or rolled back (the
        first reconcile plans from their outcome)."""
        if self._resuming is not None:
            await asyncio.shield(self._resuming)

    @staticmethod
    async def _resume(step: Coroutine[Any, Any, Any]) -> None:
        try:
            await step
        except Exception:
            log.exception("resuming an interrupted upgrade failed")

    def _adopt_upgrading(self, record: AppRecord,
                         resumes: list[Coroutine[Any, Any, Any]]) -> set[int]:
        """An upgrade/reconfigure with a durable intent: adopt its new process (start-first:
        as `<app>@next`) and the old one where it still runs, then let the executor finish
        the health wait or roll back (Executor.resume). Returns the adopted pids."""
        intent = record.intent
        assert intent is not None
        start_first = intent.strategy == "start-first"
        spec = self.store.spec_of(record)
        new_launch = self._try_adopt(spec, record.install_dir, record.process,
                                     runtime_name=next_name(record.name) if start_first
                                     else None)
        old_launch = None
        if start_first or new_launch is None:
            old_launch = self._try_adopt(record.prev_spec, record.prev_dir,
                                         record.prev_process)
        if old_launch is not None and record.prev_spec is not None:
            self.watch(record.prev_spec, old_launch, healthy=False)
        resumes.append(self.executor.resume(record, new_launch, old_launch is not None))
        return {pid for pid, launch in ((record.pid, new_launch), (record.prev_pid, old_launch))
                if pid and launch is not None}

    def _try_adopt(self, spec: AppSpec | None, install_dir: str | None,
                   proc: ProcessRecord | None,
                   runtime_name: str | None = None) -> LaunchSpec | None:
        """Adopt `proc` as an instance of `spec` (under `runtime_name` when given); its
        LaunchSpec when that worked."""
        if proc is None or spec is None or not install_dir or spec.run is None:
            return None
        try:
            launch = self.executor.launch_for(spec, Path(install_dir))
        except ActionFailed as exc:
            log.warning("%s: cannot rebuild its launch spec: %s", spec.name, exc)
            return None
        if launch is not None and runtime_name is not None:
            launch = replace(launch, name=runtime_name, log_name=spec.name)
        if launch is None or not self.runtime.adopt(launch, proc):
            return None
        return launch

    async def _adopt(self, record: AppRecord) -> int | None:
        """Adopt one app's recorded process. An upgrade/reconfigure without an intent (written
        by an older agent) cut short by a crash is finished when the new process runs (the
        old one, if still there, is stopped) and undone otherwise (back to the previous
        version's record, its process adopted if it still runs); the next reconcile then
        redoes what is still wanted."""
        name = record.name
        spec = self.store.spec_of(record)
        if record.phase == "upgrading":
            launch = self._try_adopt(spec, record.install_dir, record.process)
            if launch is not None:
                await stop_recorded(record.prev_process)
                with self.store.transaction():
                    self.store.update_app(
                        name, phase="running", prev_pid=None, prev_pgid=None,
                        prev_create_time=None,
                        message=f"adopted {record.version} after an interrupted upgrade")
                self.watch(spec, launch, healthy=False)
                return record.pid
            await stop_recorded(record.process)
            prev_launch = self._try_adopt(record.prev_spec, record.prev_dir,
                                          record.prev_process)
            self._revert(record, keep=record.prev_process if prev_launch else None)
            if prev_launch is not None and record.prev_spec is not None:
                self.watch(record.prev_spec, prev_launch, healthy=False)
                return record.prev_pid
            return None
        if record.phase == "rolling-back":
            # the recorded process (if any) is the previous version being started again
            prev_launch = self._try_adopt(record.prev_spec, record.prev_dir, record.process)
            if prev_launch is None:
                await stop_recorded(record.process)
            self._revert(record, keep=record.process if prev_launch else None)
            if prev_launch is not None and record.prev_spec is not None:
                self.watch(record.prev_spec, prev_launch, healthy=False)
                return record.pid
            return None
        launch = self._try_adopt(spec, record.install_dir, record.process)
        if record.phase in ("deploying", "removing") or launch is None:
            with self.store.transaction():
                if record.phase == "deploying":
                    self.store.update_app(
                        name, phase="running" if launch else "pending",
                        message="adopted after an agent restart" if launch
                        else "not running after an agent restart")
                if launch is None and record.process is not None:
                    self.store.set_process(name, None)
        if launch is not None:
            self.watch(spec, launch, healthy=False)
            return record.pid
        return None

    def _revert(self, record: AppRecord, keep: ProcessRecord | None) -> None:
        """Back to the previous version's record; `keep` is its still-running process."""
        rolling_back = record.phase == "rolling-back"
        process: dict[str, Any] = {
            "pid": keep.pid if keep else None, "pgid": keep.pgid if keep else None,
            "create_time": keep.create_time if keep else None,
            "proc_version": keep.version if keep else None,
            "prev_pid": None, "prev_pgid": None, "prev_create_time": None,
            "upgrade_intent": None,
        }
        with self.store.transaction():
            if record.prev_spec_json and record.prev_version and record.prev_spec is not None:
                self.store.update_app(
                    record.name, version=record.prev_version,
                    spec_json=record.prev_spec_json, spec_hash=record.prev_spec.spec_hash(),
                    install_dir=record.prev_dir, prev_version=None, prev_spec_json=None,
                    prev_dir=None, phase="running" if keep else "pending",
                    message=f"{record.version}: change interrupted by an agent restart",
                    failed_spec_hash=record.spec_hash if rolling_back else None,
                    failed_version=record.version if rolling_back else None, **process,
                )
            else:
                self.store.update_app(record.name, phase="pending",
                                      message="change interrupted by an agent restart",
                                      **process)

    def _sweep_orphans(self, adopted: set[int]) -> None:
        """Stop app processes of this node that no record owns (an agent killed between
        spawning a process and recording its pid)."""
        if self.apps_root is None:
            return
        apps_root = str(self.apps_root)
        me = os.getpid()
        # an adopted app's descendants that left its group (setsid) carry its marker
        kept = set()
        for pid in adopted:
            with contextlib.suppress(psutil.Error):
                kept.add(instance_of(psutil.Process(pid)))
        kept.discard(None)
        for proc in psutil.process_iter(["pid"]):
            if proc.pid in adopted or proc.pid == me:
                continue
            try:
                if proc.uids().real != os.getuid():
                    continue
                env = proc.environ()
                if env.get("GITOPS_NODE_ID") != self.node_id or not env.get(
                        "GITOPS_APP_DIR", "").startswith(apps_root):
                    continue
                pgid = os.getpgid(proc.pid)
                if pgid in adopted or env.get(INSTANCE_ENV) in kept:
                    continue
                log.warning("stopping orphan app process %d (%s)", proc.pid, proc.name())
                kill_group(pgid)
            except (psutil.Error, OSError):
                continue
