"""The node agent: the reconcile loop tying source, loader, planner, executor, runtime and store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler import __version__
from reconciler.errors import ReconcileError, SignatureError, SourceError
from reconciler.events import Event, iso_time, make_event
from reconciler.executor import ActionFailed, ActionResult, Executor
from reconciler.plan import Plan
from reconciler.runtimes.base import LaunchSpec, ProcessRecord, Runtime
from reconciler.spec import AppSpec
from reconciler.state import CurrentState, DesiredState
from reconciler.status import AppStatus, NodeStatus, summarize
from reconciler.store import AppRecord, Store, meta_float, pid_alive
from reconciler.telemetry import Telemetry

log = logging.getLogger(__name__)

REDACTED = "***"
# A reconcile running longer than this is considered stuck: the systemd watchdog stops
# being fed so systemd can restart the agent (apps keep running and are adopted).
STUCK_AFTER = 900.0
# Trigger reasons of the agent's own schedule. A run for one of these that finds nothing to
# do records no events (every 30 s on every node they would bury the real ones); a run a
# person or a push asked for (rpc, fleet, source.changed, resume, once, startup...) always
# answers with a reconcile.finished.
QUIET_REASONS = frozenset({"poll", "source retry"})


@dataclass
class AgentConfig:
    node_id: str
    repo_url: str
    state_dir: Path
    labels: dict[str, str] = field(default_factory=dict)
    branch: str = "main"
    apps_path: str = "apps"
    interval: float = 30.0
    jitter: float = 0.1  # fraction of the interval
    heartbeat: float = 10.0
    fetch_timeout: float = 30.0
    port_offset: int = 0
    outbox_max: int = 100_000
    allowed_signers: Path | None = None
    gpg_keyring: Path | None = None


@dataclass
class RunInfo:
    """What the last (or current) reconcile saw and did."""

    run_id: str | None = None
    started_at: float | None = None
    finished_at: str | None = None
    duration_ms: float | None = None
    outcome: str | None = None
    message: str = ""
    trace_id: str | None = None


def redact_spec(spec: AppSpec) -> dict[str, Any]:
    """JSON-ready spec with env values replaced by "***" and URL credentials removed (safe
    to publish)."""
    from reconciler.source import redact_url

    data = spec.model_dump(mode="json", by_alias=True)
    run = data.get("run")
    if run and run.get("env"):
        run["env"] = {key: REDACTED for key in run["env"]}
    # user:password@ in an archive or probe URL is a secret too
    for holder in (data.get("source"), (data.get("health") or {}).get("http")):
        if isinstance(holder, dict) and isinstance(holder.get("url"), str):
            holder["url"] = redact_url(holder["url"])
    return data


class Agent:
    """One node's agent. Implements agent_api.AgentAPI (for the mesh), runtimes.RuntimeListener
    (supervision callbacks) and executor.Hooks (events and health for the executor)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        runtime: Runtime | None = None,
        telemetry: Telemetry | None = None,
        notifier: Any = None,
    ) -> None:
        from reconciler.artifacts import ArtifactStore
        from reconciler.health import HealthMonitor
        from reconciler.loader import ParseCache
        from reconciler.source import GitSource, SignatureVerifier

        self.config = config
        self.node_id = config.node_id
        self.labels = dict(config.labels)
        self.repo_url = config.repo_url
        self.branch = config.branch
        state_dir = Path(config.state_dir)
        self._lock_fd = _lock_state_dir(state_dir)
        try:
            self.store = Store(state_dir, outbox_max=config.outbox_max)
        except BaseException:
            os.close(self._lock_fd)
            raise
        with self.store.transaction():  # for `status --state-dir` while the agent is down
            self.store.set_meta("node_id", config.node_id)
            self.store.set_meta("labels", json.dumps(self.labels, sort_keys=True))
            self.store.set_meta("agent_version", __version__)
        verifier = None
        if config.allowed_signers or config.gpg_keyring:
            verifier = SignatureVerifier(allowed_signers=config.allowed_signers,
                                         gpg_keyring=config.gpg_keyring)
        self.source = GitSource(config.repo_url, config.branch, state_dir / "source",
                                fetch_timeout=config.fetch_timeout, verifier=verifier)
        self.artifacts = ArtifactStore(state_dir / "apps")
        if runtime is None:
            from reconciler.runtimes.process import ProcessRuntime

            runtime = ProcessRuntime(self)
        self.runtime = runtime
        self.telemetry = telemetry or Telemetry(config.node_id, agent_version=__version__)
        self.telemetry.set_phase_source(self._phase_counts)
        self.monitor = HealthMonitor(self._on_health_change)
        self.parse_cache = ParseCache()
        self.executor = Executor(
            node_id=config.node_id, store=self.store, runtime=self.runtime,
            artifacts=self.artifacts, hooks=self, log_dir=state_dir / "logs",
            port_offset=config.port_offset, telemetry=self.telemetry,
        )
        if notifier is None:
            try:
                from reconciler.sdnotify import SdNotifier

                notifier = SdNotifier.from_env()
            except ImportError:
                notifier = None
        self.notifier = notifier
        self._listeners: list[Callable[[], None]] = []
        self._notify_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._pending_run: tuple[str, str] | None = None
        self._run_done: dict[str, asyncio.Future[RunInfo]] = {}
        self._worker: asyncio.Task[None] | None = None
        self._scheduler: Any = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._source_failures = 0
        self._reconciling = False
        self._current_run: str | None = None
        self._current_revision: str | None = None
        self._desired: DesiredState | None = None
        self._desired_revision: str | None = self.store.get_meta("desired_revision")
        self._source_error: str | None = self.store.get_meta("source_error")
        self._spec_errors: list[str] = [
            e for e in (self.store.get_meta("spec_errors") or "").split("\n") if e]
        # the last finished run and the one running now
        self._last = RunInfo()
        self._run: RunInfo | None = None
        # when the last reconcile that ran (not skipped) ended and how long it took: status
        # keeps them while the next one runs; after a restart they come from the store
        self._last_reconcile: tuple[str | None, float | None] = (
            self.store.get_meta("last_reconcile"),
            meta_float(self.store.get_meta("last_reconcile_ms")))
        self._run_reason = ""
        self._announced = False  # reconcile.started recorded for the current run
        self._ready_sent = False
        self._closed = False
        self._launches: dict[str, LaunchSpec | None] = {}
        self._down: set[str] = set()  # supervised apps that exited for good / crash-looped
        self._completed: set[str] = set()  # exited 0 under a never/on-failure policy

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, first_reconcile: bool = True, schedule: bool = True) -> None:
        """Adopt what a previous agent left running, start the poll schedule (unless not
        `schedule`: --once) and (by default) the first reconcile. Returns at once;
        reconciles run in the background."""
        self._loop = asyncio.get_running_loop()
        with self.store.transaction():
            self.record("node.started", message=f"agent {__version__} started")
        await self._adopt_all()
        self._worker = asyncio.create_task(self._work(), name=f"reconcile-{self.node_id}")
        if schedule:
            self._start_scheduler()
        if first_reconcile:
            self.trigger("startup")

    def _start_scheduler(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        scheduler = AsyncIOScheduler(event_loop=self._loop)
        interval = max(self.config.interval, 0.05)
        scheduler.add_job(
            self.trigger, "interval", args=["poll"], seconds=interval,
            jitter=max(0.0, interval * self.config.jitter) or None, id="poll",
            coalesce=True, max_instances=1, misfire_grace_time=None,
        )
        scheduler.add_job(self._heartbeat, "interval", seconds=self._heartbeat_period(),
                          id="heartbeat", coalesce=True, max_instances=1)
        scheduler.start()
        self._scheduler = scheduler

    def _heartbeat_period(self) -> float:
        period = self.config.heartbeat
        watchdog = self.notifier.watchdog_interval() if self.notifier else None
        if watchdog:
            period = min(period, watchdog / 2)
        return max(period, 0.05)

    def _heartbeat(self) -> None:
        """Feed the systemd watchdog while the loop makes progress; refresh observers."""
        run = self._run
        stuck = (run is not None and run.started_at is not None
                 and time.monotonic() - run.started_at > STUCK_AFTER)
        if self.notifier and not stuck:
            self.notifier.watchdog()
        self._notify_soon()

    async def close(self, stop_apps: bool = False) -> None:
        """Stop reconciling. Apps keep running (the next agent adopts them) unless
        `stop_apps`: then they stop, dependents first."""
        if self._closed:
            return
        self._closed = True
        if self.notifier:
            self.notifier.stopping("stopping")
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for run_id, future in self._run_done.items():  # nobody waits forever on a closed agent
            if not future.done():
                future.set_result(RunInfo(run_id=run_id, outcome="skipped",
                                          message="agent stopped"))
        self._run_done.clear()
        await self.monitor.close()
        if stop_apps:
            await self.executor.stop_all(self._stop_order())
            with self.store.transaction():
                for name in self.store.apps():
                    self.store.set_process(name, None)
                    self.store.update_app(name, health="unknown",
                                          message="stopped when the agent exited")
        await self.runtime.close(stop_apps=stop_apps)
        try:
            with self.store.transaction():
                self.record("node.stopping", message="apps stopped" if stop_apps
                            else "apps left running")
        except Exception:  # the store may be gone in a broken shutdown; nothing to add
            log.debug("could not record node.stopping", exc_info=True)
        await asyncio.to_thread(self.source.close)
        self.telemetry.shutdown()
        self.store.close()
        os.close(self._lock_fd)  # releases the state dir for the next agent

    def _stop_order(self) -> list[list[str]]:
        from reconciler.graph import DependencyGraph

        records = self.store.apps()
        specs = {name: r.spec for name, r in records.items()}
        try:
            return DependencyGraph.from_apps(specs).removal_order(list(specs))
        except Exception:  # a broken graph must not keep apps running: stop all at once
            return [sorted(specs)]

    @property
    def reconciling(self) -> bool:
        return self._reconciling

    # -- AgentAPI -------------------------------------------------------------------------
    def add_listener(self, on_change: Callable[[], None]) -> None:
        self._listeners.append(on_change)

    def _notify_soon(self) -> None:
        if self._notify_scheduled or self._loop is None or self._loop.is_closed():
            return
        self._notify_scheduled = True
        self._loop.call_soon(self._notify)

    def _notify(self) -> None:
        self._notify_scheduled = False
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("status listener failed")

    def trigger(self, reason: str) -> str:
        """Ask for a reconcile; at most one runs and one waits. Returns the run id that will
        cover this request (the queued one's when one is queued already). A queued poll
        takes the reason of a person's request it covers, so that run answers with events."""
        if self._pending_run is not None:
            run_id, queued = self._pending_run
            if queued in QUIET_REASONS and reason not in QUIET_REASONS:
                self._pending_run = (run_id, reason)
            return run_id
        run_id = uuid.uuid4().hex[:12]
        self._pending_run = (run_id, reason)
        self._wake.set()
        return run_id

    async def wait_run(self, run_id: str) -> RunInfo:
        """Until the reconcile `run_id` finished (for --once, tests and benchmarks)."""
        assert self._loop is not None
        if self._last.run_id == run_id:  # finished already
            return self._last
        if self._closed:
            return RunInfo(run_id=run_id, outcome="skipped", message="agent stopped")
        future = self._run_done.setdefault(run_id, self._loop.create_future())
        return await asyncio.shield(future)

    async def reconcile_now(self, reason: str = "manual") -> RunInfo:
        return await self.wait_run(self.trigger(reason))

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._pending_run is None:
                continue
            run_id, reason = self._pending_run
            self._pending_run = None
            try:
                info = await self._reconcile(run_id, reason)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one bad run end the loop
                log.exception("reconcile %s crashed", run_id)
                info = RunInfo(run_id=run_id, outcome="failure", message=str(exc))
            future = self._run_done.pop(run_id, None)
            if future is not None and not future.done():
                future.set_result(info)

    # -- reconcile ------------------------------------------------------------------------
    async def _reconcile(self, run_id: str, reason: str) -> RunInfo:
        """One run. Events: reconcile.started once the run knows it has something to do or
        report (a new revision, actions, a failure, a source that recovered), with the
        revision it will apply (none when the source failed before one was known); then
        source.fetched and app.*; then reconcile.finished with the applied revision.

        A run that finds nothing to do (revision unchanged and applied, empty plan, nothing
        failed) records no events when the agent's own schedule asked for it (QUIET_REASONS:
        poll, source retry); for any other reason (rpc, fleet trigger, notify, resume,
        --once, startup) it records just reconcile.finished, outcome success, "no changes",
        so the person who asked sees the answer. Either way status gets last_reconcile_at
        and last_reconcile_ms (also kept in the store for `status --state-dir`).

        Likewise a poll or source retry that meets the very source failure already reported
        records nothing (no started / source.failed / finished): an outage is reported once
        when it starts or its error changes, and once more (source.fetched for a new
        revision, reconcile.*) when it ends; status keeps source_error meanwhile."""
        self._current_run = run_id
        self._reconciling = True
        started = time.monotonic()
        info = self._run = RunInfo(run_id=run_id, started_at=started)
        self._run_reason, self._announced = reason, False
        try:
            with self.telemetry.span("reconcile", node=self.node_id, run_id=run_id,
                                     reason=reason):
                info.trace_id = self.telemetry.trace_id()
                if self.store.node_suspended:
                    info.outcome, info.message = "skipped", "node suspended"
                    return info
                outcome, message = await self._reconcile_steps()
                info.outcome, info.message = outcome, message
                info.duration_ms = round((time.monotonic() - started) * 1000, 1)
                info.finished_at = iso_time(self._now())
                self._last_reconcile = (info.finished_at, info.duration_ms)
                with self.store.transaction():
                    self.store.set_meta("last_reconcile", info.finished_at)
                    self.store.set_meta("last_reconcile_ms", str(info.duration_ms))
                    if self._announced or reason not in QUIET_REASONS:
                        self.record("reconcile.finished", outcome=outcome,
                                    revision=self.store.get_meta("applied_revision"),
                                    duration_ms=info.duration_ms, message=message or None,
                                    data={"reason": reason})
                self.telemetry.reconcile_duration.record(
                    info.duration_ms / 1000, {"outcome": outcome}
                )
                return info
        finally:
            if info.finished_at is None:
                info.finished_at = iso_time(self._now())
            if info.duration_ms is None:
                info.duration_ms = round((time.monotonic() - started) * 1000, 1)
            self._last, self._run = info, None
            self._reconciling = False
            self._current_run = None
            self._current_revision = None
            if not self._ready_sent and self.notifier:
                self._ready_sent = True
                self.notifier.ready(f"first reconcile: {info.outcome}")
            if self.notifier and getattr(self.notifier, "enabled", True):
                self.notifier.status(self._summary_line())
            self._notify_soon()

    def _announce(self, revision: str | None) -> None:
        """Record the current run's reconcile.started, once, naming the revision it applies
        (None when not known: the source failed)."""
        if self._announced:
            return
        self._announced = True
        with self.store.transaction():
            self.record("reconcile.started", revision=revision, message=self._run_reason)

    async def _fetch(self) -> str:
        """ls-remote, then fetch only when the remote moved (GitSource.poll); then the
        signature check when one is configured. Raises SourceError / SignatureError."""
        fetch_started = time.monotonic()
        revision = await asyncio.to_thread(self.source.poll)
        self.telemetry.fetch_duration.record(time.monotonic() - fetch_started)
        if self.source.verifier is not None:
            await asyncio.to_thread(self.source.verify, revision)
        return revision

    def _fetched(self, revision: str) -> None:
        """A new (verified) revision becomes the desired one."""
        if revision != self._desired_revision:
            with self.store.transaction():
                self.store.set_meta("desired_revision", revision)
                self.record("source.fetched", revision=revision,
                            message=f"{self.branch} at {revision[:12]}")
            self._desired_revision = revision

    async def _desired_state(self, revision: str) -> DesiredState:
        from reconciler.loader import load_files
        from reconciler.targeting import desired_for_node

        files = await asyncio.to_thread(self.source.spec_files, revision, self.config.apps_path)
        result = await asyncio.to_thread(
            lambda: load_files(files, self.parse_cache, apps_path=self.config.apps_path)
        )
        return desired_for_node(result, self.node_id, self.labels, revision)

    async def _reconcile_steps(self) -> tuple[str, str]:
        from reconciler.plan import make_plan

        try:
            revision = await self._fetch()
        except (SourceError, SignatureError) as exc:
            # an unsigned or unreachable revision never becomes the desired one: the node
            # stays at its last good revision and reports the source problem. A poll or
            # retry that meets the same failure again records nothing (an outage would
            # flood the event stream); a new or different failure, or a run someone asked
            # for, is news.
            repeat = str(exc) == self._source_error and self._run_reason in QUIET_REASONS
            if not repeat:
                self._announce(None)
            return self._source_failed(exc, record=not repeat)
        if (self._source_error is not None or revision != self._desired_revision
                or revision != self.store.get_meta("applied_revision")):
            self._announce(revision)  # something new to report even if the plan is empty
        self._fetched(revision)
        self._source_failures = 0
        if self._source_error is not None:
            self._source_error = None
            self.store.set_meta("source_error", None)
        self._current_revision = revision
        desired = self._desired
        if desired is None or desired.revision != revision:
            # only a new revision is read and loaded again: for the same one it cannot differ
            desired = await self._desired_state(revision)
        self._desired = desired
        self._spec_errors = [str(p) for p in desired.problems]
        plan = make_plan(desired, self._current_state())
        if plan.actions or plan.metadata_only:
            self._announce(revision)
        results = await self.executor.apply(
            plan, desired.apps, lambda path: self.source.read_file(revision, path)
        )
        self._forget_abandoned_failures(desired)
        spec_errors = "\n".join(self._spec_errors) or None
        if (self.store.get_meta("applied_revision"), self.store.get_meta("spec_errors")) != (
                revision, spec_errors):
            with self.store.transaction():
                self.store.set_meta("applied_revision", revision)
                self.store.set_meta("spec_errors", spec_errors)
        outcome = self._outcome(plan, results)
        if outcome[0] != "success":
            self._announce(revision)  # a held failure is news on every run
        return outcome

    def _forget_abandoned_failures(self, desired: DesiredState) -> None:
        """A rolled-back version that is no longer asked for (the push was reverted, or a
        fix pushed that matches what runs) stops marking the node failed."""
        for name, record in self.store.apps().items():
            spec = desired.apps.get(name)
            if spec is None or record.failed_spec_hash is None:
                continue
            wanted = spec.spec_hash()
            if wanted != record.failed_spec_hash and wanted == record.spec_hash \
                    and record.phase == "running":
                with self.store.transaction():
                    self.store.update_app(name, failed_spec_hash=None, failed_version=None,
                                          message="")

    def _outcome(self, plan: Plan, results: list[ActionResult]) -> tuple[str, str]:
        problems = [f"{r.action.app}: {r.message}" for r in results if r.outcome != "success"]
        acted = {r.action.app for r in results}
        # apps left failed by an earlier run (held by the planner) keep the run a failure
        problems += [
            f"{name}: {record.phase}: {record.message}"
            for name, record in self.store.apps().items()
            if name not in acted and record.phase in ("failed", "blocked")
        ]
        if self._spec_errors:
            problems.insert(0, f"{len(self._spec_errors)} spec error(s): "
                               + "; ".join(self._spec_errors[:3]))
        if problems:
            return "failure", "; ".join(problems)
        changed = len(results)
        return "success", f"{changed} action(s)" if changed else "no changes"

    def _source_failed(self, exc: ReconcileError, record: bool = True) -> tuple[str, str]:
        """Keep running what runs; retry with backoff (signature problems wait for a poll).
        `record`: False for a repeat of the failure already reported (no source.failed)."""
        reason = str(exc)
        self._source_error = reason
        if record:
            with self.store.transaction():
                self.store.set_meta("source_error", reason)
                self.record("source.failed", outcome="failure", message=reason)
        if isinstance(exc, SourceError) and not self._closed and self._loop is not None:
            self._source_failures += 1
            delay = min(2.0 ** (self._source_failures - 1), max(self.config.interval, 1.0))
            if self._retry_handle is not None:
                self._retry_handle.cancel()
            self._retry_handle = self._loop.call_later(delay, self.trigger, "source retry")
        return "failure", f"source: {reason}"

    def _current_state(self) -> CurrentState:
        names = self.runtime.names()
        running = {name for name, record in self.store.apps().items()
                   if self._is_running(record, names)}
        return self.store.current_state(running=running)

    def _is_running(self, record: AppRecord, names: set[str] | None = None) -> bool:
        """Running or in restart backoff. The runtime knows every app it supervises (a stop
        forgets it); the listener callbacks tell which of those exited for good. Cheaper
        than runtime.stats(), which reads cpu and memory."""
        if spec_of(record).run is None:
            return record.install_dir is not None and record.phase == "running"
        if names is None:
            names = self.runtime.names()
        return record.name in names and record.name not in self._down

    # -- startup adoption -----------------------------------------------------------------
    async def _adopt_all(self) -> None:
        """Take over processes a previous agent left; finish or undo interrupted changes."""
        adopted: set[int] = set()
        for name, record in self.store.apps().items():
            try:
                pid = await self._adopt(record)
            except Exception:
                log.exception("%s: adoption failed", name)
                pid = None
            if pid:
                adopted.add(pid)
        await asyncio.to_thread(self._sweep_orphans, adopted)

    def _try_adopt(self, spec: AppSpec | None, install_dir: str | None,
                   proc: ProcessRecord | None) -> LaunchSpec | None:
        """Adopt `proc` as an instance of `spec`; its LaunchSpec when that worked."""
        if proc is None or spec is None or not install_dir or spec.run is None:
            return None
        try:
            launch = self.executor.launch_for(spec, Path(install_dir))
        except ActionFailed as exc:
            log.warning("%s: cannot rebuild its launch spec: %s", spec.name, exc)
            return None
        if launch is None or not self.runtime.adopt(launch, proc):
            return None
        return launch

    async def _adopt(self, record: AppRecord) -> int | None:
        """Adopt one app's recorded process. An upgrade/reconfigure cut short by a crash is
        finished when the new process runs (the old one, if still there, is stopped) and
        undone otherwise (back to the previous version's record, its process adopted if it
        still runs); the next reconcile then redoes what is still wanted."""
        name = record.name
        if record.phase == "upgrading":
            launch = self._try_adopt(spec_of(record), record.install_dir, record.process)
            if launch is not None:
                await _stop_stray(record.prev_process)
                with self.store.transaction():
                    self.store.update_app(
                        name, phase="running", prev_pid=None, prev_pgid=None,
                        prev_create_time=None,
                        message=f"adopted {record.version} after an interrupted upgrade")
                self.watch(spec_of(record), launch, healthy=False)
                return record.pid
            await _stop_stray(record.process)
            prev_launch = self._try_adopt(record.prev_spec, record.prev_dir,
                                          record.prev_process)
            await self._revert(record, keep=record.prev_process if prev_launch else None)
            if prev_launch is not None and record.prev_spec is not None:
                self.watch(record.prev_spec, prev_launch, healthy=False)
                return record.prev_pid
            return None
        if record.phase == "rolling-back":
            # the recorded process (if any) is the previous version being started again
            prev_launch = self._try_adopt(record.prev_spec, record.prev_dir, record.process)
            if prev_launch is None:
                await _stop_stray(record.process)
            await self._revert(record, keep=record.process if prev_launch else None)
            if prev_launch is not None and record.prev_spec is not None:
                self.watch(record.prev_spec, prev_launch, healthy=False)
                return record.pid
            return None
        launch = self._try_adopt(spec_of(record), record.install_dir, record.process)
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
            self.watch(spec_of(record), launch, healthy=False)
            return record.pid
        return None

    async def _revert(self, record: AppRecord, keep: ProcessRecord | None) -> None:
        """Back to the previous version's record; `keep` is its still-running process."""
        rolling_back = record.phase == "rolling-back"
        process: dict[str, Any] = {
            "pid": keep.pid if keep else None, "pgid": keep.pgid if keep else None,
            "create_time": keep.create_time if keep else None,
            "proc_version": keep.version if keep else None,
            "prev_pid": None, "prev_pgid": None, "prev_create_time": None,
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
        import psutil

        apps_root = str(self.artifacts.root) if hasattr(self.artifacts, "root") else None
        if apps_root is None:
            return
        me = os.getpid()
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
                if pgid in adopted:
                    continue
                log.warning("stopping orphan app process %d (%s)", proc.pid, proc.name())
                os.killpg(pgid, signal.SIGKILL)
            except (psutil.Error, OSError):
                continue

    # -- RuntimeListener --------------------------------------------------------------------
    def on_started(self, record: ProcessRecord, restarted: bool) -> None:
        self._down.discard(record.name)
        self._completed.discard(record.name)
        if self._closed or self.store.get_app(record.name) is None:
            return
        with self.store.transaction():
            self.store.set_process(record.name, record)
            if restarted:
                app = self.store.get_app(record.name)
                assert app is not None
                self.store.update_app(record.name, restarts=app.restarts + 1)
                self.record("app.restarted", app=record.name, version=record.version,
                            message="restarted by the supervisor after it exited")
        self._notify_soon()

    def on_exited(self, name: str, returncode: int | None, restart_in: float | None) -> None:
        record = None if self._closed else self.store.get_app(name)
        if restart_in is None and record is not None:
            policy = spec_of(record).restart.policy
            if returncode == 0 and policy != "always":
                # a job that finished: its policy says leave it, so no drift to heal
                self._completed.add(name)
                with self.store.transaction():
                    self.store.update_app(name, message=f"exited with code 0 (restart policy "
                                                        f"{policy}: not restarted)")
            else:
                self._down.add(name)
        when = f"restart in {restart_in:.1f}s" if restart_in is not None else "not restarted"
        log.info("%s exited (code %s), %s", name, returncode, when)
        self._notify_soon()

    def on_crash_loop(self, name: str, message: str) -> None:
        self._down.add(name)
        app = None if self._closed else self.store.get_app(name)
        if app is None:
            return
        self._launches.pop(name, None)
        if self._loop is not None:
            self._loop.create_task(self.monitor.stop(name))
        with self.store.transaction():
            self.store.update_app(name, phase="failed", health="unhealthy", message=message,
                                  failed_spec_hash=app.spec_hash)
            self.store.set_process(name, None)
            self.record("app.failed", app=name, version=app.version, outcome="failure",
                        message=message)
        self._notify_soon()

    # -- executor.Hooks ---------------------------------------------------------------------
    def record(self, type: str, **fields: Any) -> Event:
        """Queue an event (joins the caller's store transaction) and wake observers."""
        fields.setdefault("revision", self._current_revision
                          or self.store.get_meta("applied_revision"))
        fields.setdefault("run_id", self._current_run)
        fields.setdefault("trace_id", self.telemetry.trace_id())
        event = make_event(type, self.node_id, self._now(), **fields)
        self.store.add_event(event)
        level = logging.WARNING if event.outcome == "failure" else logging.INFO
        log.log(level, "%s%s%s", type, f" {event.app}" if event.app else "",
                f": {event.message}" if event.message else "",
                extra={"event": type, "app": event.app, "run_id": event.run_id})
        self._notify_soon()
        return event

    def watch(self, spec: AppSpec, launch: LaunchSpec | None, healthy: bool = True) -> None:
        self._launches[spec.name] = launch
        if spec.health.probe_kind is None:
            return
        self.monitor.start(
            spec.name, spec.health,
            cwd=launch.workdir if launch else self.config.state_dir,
            env=launch.env if launch else {}, port_offset=self.config.port_offset,
            initial="healthy" if healthy else "unknown",
        )

    async def unwatch(self, name: str) -> None:
        self._launches.pop(name, None)
        await self.monitor.stop(name)

    async def wait_healthy(
        self, spec: AppSpec, launch: LaunchSpec | None, is_alive: Callable[[], bool]
    ) -> tuple[bool, str]:
        from reconciler.health import wait_healthy

        result = await wait_healthy(
            spec.health, cwd=launch.workdir if launch else self.config.state_dir,
            env=launch.env if launch else {}, port_offset=self.config.port_offset,
            is_alive=is_alive, timeout=spec.health.start_timeout,
        )
        return result.ok, result.message

    async def dependency_problem(self, name: str) -> str | None:
        record = self.store.get_app(name)
        if record is None:
            return "not installed"
        if record.phase in ("failed", "blocked"):
            return record.phase
        if not self._is_running(record):
            return "not running"
        if record.health == "healthy":
            return None
        # unknown (just adopted) or unhealthy: ask the probe now rather than trust old news
        if spec_of(record).health.probe_kind is None:
            return None
        if name not in self.monitor.apps():
            return f"{record.health} health"
        result = await self.monitor.probe_now(name)
        return None if result.ok else f"not healthy: {result.message}"

    def _on_health_change(self, app: str, old: str, new: str, result: Any) -> None:
        record = None if self._closed else self.store.get_app(app)
        if record is None or record.health == new:
            return
        with self.store.transaction():
            self.store.update_app(app, health=new)
            self.record("app.health-changed", app=app, version=record.version,
                        message=f"{old} -> {new}: {getattr(result, 'message', '')}".strip(": "),
                        data={"from": old, "to": new})
        self._notify_soon()

    # -- status / state -------------------------------------------------------------------
    def _now(self) -> datetime:
        return datetime.now(UTC)

    def _phase_counts(self) -> Mapping[str, int]:
        counts: dict[str, int] = {}
        for record in self.store.apps().values():
            counts[record.phase] = counts.get(record.phase, 0) + 1
        return counts

    def _app_status(self, record: AppRecord) -> AppStatus:
        spec = spec_of(record)
        stats = self.runtime.stats(record.name)
        health = record.health
        if spec.health.probe_kind is None and spec.run is not None and record.phase == "running":
            alive = stats is not None and stats.state in ("running", "backoff")
            alive = alive or record.name in self._completed
            health = "healthy" if alive and record.name not in self._down else "unhealthy"
        started_at = None
        if stats is not None and stats.started_at is not None:
            started_at = iso_time(datetime.fromtimestamp(stats.started_at, UTC))
        return AppStatus(
            name=record.name, version=record.version, phase=record.phase, health=health,
            message=record.message, layer=spec.layer, labels=dict(spec.labels),
            depends_on=list(spec.depends_on), suspended=record.suspended,
            failed_version=record.failed_version, restarts=record.restarts,
            pid=stats.pid if stats else None, started_at=started_at,
            uptime_s=round(stats.uptime_s, 1) if stats and stats.uptime_s else None,
            cpu_percent=stats.cpu_percent if stats else None,
            rss_bytes=stats.rss_bytes if stats else None,
        )

    def status(self) -> NodeStatus:
        apps = [self._app_status(r) for r in self.store.apps().values()]
        applied = self.store.get_meta("applied_revision")
        suspended = self.store.node_suspended
        state, message = summarize(
            apps, reconciling=self._reconciling, suspended=suspended,
            source_error=self._source_error, spec_errors=bool(self._spec_errors),
            at_desired_revision=applied is not None and applied == self._desired_revision,
        )
        backlog, dropped = self.store.outbox_stats()
        return NodeStatus(
            node=self.node_id, labels=self.labels, revision=applied, status=state,
            message=message, apps=apps, updated_at=iso_time(self._now()),
            agent_version=__version__, desired_revision=self._desired_revision,
            source_error=self._source_error, spec_errors=list(self._spec_errors),
            last_reconcile_at=self._last_reconcile[0], last_reconcile_ms=self._last_reconcile[1],
            run_id=(self._run or self._last).run_id, heartbeat_interval_s=self.config.heartbeat,
            outbox_backlog=backlog, outbox_dropped=dropped,
            trace_id=(self._run or self._last).trace_id,
        )

    def _summary_line(self) -> str:
        status = self.status()
        return f"{status.status}: {status.message}"

    def state(self) -> dict[str, Any]:
        desired = self._desired
        current: dict[str, Any] = {}
        for name, record in self.store.apps().items():
            current[name] = {
                "version": record.version, "spec_hash": record.spec_hash,
                "phase": record.phase, "health": record.health, "message": record.message,
                "running": self._is_running(record), "suspended": record.suspended,
                "install_dir": record.install_dir, "previous_version": record.prev_version,
                "failed_version": record.failed_version,
                "applied_revision": record.applied_revision, "restarts": record.restarts,
                "spec": redact_spec(spec_of(record)),
            }
        return {
            "node": self.node_id,
            "desired": {
                "revision": desired.revision if desired else None,
                "apps": {n: redact_spec(s) for n, s in desired.apps.items()} if desired else {},
                "invalid": sorted(desired.invalid) if desired else [],
                "problems": [str(p) for p in desired.problems] if desired else [],
            },
            "current": current,
        }

    async def plan(self) -> Plan:
        from reconciler.plan import make_plan

        revision = await self._fetch()  # records nothing: a plan changes nothing
        desired = await self._desired_state(revision)
        return make_plan(desired, self._current_state())

    async def check_health(self, app: str | None = None) -> dict[str, str]:
        names = [app] if app else sorted(self.store.apps())
        result: dict[str, str] = {}
        for name in names:
            record = self.store.get_app(name)
            if record is None:
                raise ValueError(f"unknown app {name!r}")
            if name in self.monitor.apps():
                await self.monitor.probe_now(name)
                result[name] = self.monitor.health(name)
            else:
                result[name] = self._app_status(record).health
        return result

    async def suspend(self, app: str | None = None) -> None:
        await self._set_suspended(app, True)

    async def resume(self, app: str | None = None) -> None:
        await self._set_suspended(app, False)
        self.trigger("resume")

    async def _set_suspended(self, app: str | None, suspended: bool) -> None:
        with self.store.transaction():
            if app is None:
                self.store.set_meta("node_suspended", "1" if suspended else None)
                log.info("node %s", "suspended" if suspended else "resumed")
            else:
                record = self.store.get_app(app)
                if record is None:
                    raise ValueError(f"unknown app {app!r}")
                changes: dict[str, Any] = {"suspended": suspended}
                if not suspended:
                    # resume is also how an operator asks to retry a spec that failed
                    changes.update(failed_spec_hash=None)
                self.store.update_app(app, **changes)
                self.record("app.suspended" if suspended else "app.resumed", app=app,
                            version=record.version)
        self._notify_soon()


_SPEC_CACHE: dict[str, AppSpec] = {}


class StateDirBusy(Exception):
    """Another agent runs with this state dir."""


def _lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on <state>/agent.lock for the agent's lifetime: two agents on
    one state dir would adopt, restart and stop the same processes."""
    import fcntl

    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateDirBusy(f"{state_dir} is in use by another agent (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def _stop_stray(proc: ProcessRecord | None, timeout: float = 5.0) -> None:
    """Stop a recorded process that must not keep running (the other half of an interrupted
    upgrade): SIGTERM to its group, SIGKILL after `timeout`. Only when pid and create_time
    still name that process."""
    if proc is None or not pid_alive(proc.pid, proc.create_time):
        return
    log.warning("%s: stopping leftover %s process %d", proc.name, proc.version, proc.pid)
    with contextlib.suppress(OSError):
        os.killpg(proc.pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(proc.pid, proc.create_time) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    with contextlib.suppress(OSError):
        if pid_alive(proc.pid, proc.create_time):
            os.killpg(proc.pgid, signal.SIGKILL)


def spec_of(record: AppRecord) -> AppSpec:
    """The record's spec, parsed once per distinct spec (status runs often)."""
    spec = _SPEC_CACHE.get(record.spec_json)
    if spec is None:
        if len(_SPEC_CACHE) > 4096:
            _SPEC_CACHE.clear()
        spec = _SPEC_CACHE[record.spec_json] = record.spec
    return spec
