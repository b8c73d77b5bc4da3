"""The node agent: the composition root of one node, and the façade the mesh calls (AgentAPI).

It builds the parts and ties them together; each part has its own module:
  loop.ReconcileLoop        runs reconciles (fetch, load, plan, apply) one at a time
  supervision.Supervision   runtime and health callbacks, the executor's health hooks
  recovery.Recovery         adoption and clean-up when the agent starts
  status_view.StatusView    status and state, built by core.status
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler import __version__
from reconciler.core.events import Event, make_event
from reconciler.core.graph import DependencyGraph
from reconciler.core.plan import Plan
from reconciler.core.rollout import RolloutCoordinator
from reconciler.core.state import CurrentState
from reconciler.core.states import EventType
from reconciler.core.status import NodeStatus
from reconciler.node.artifacts import ArtifactStore
from reconciler.node.executor import Executor
from reconciler.node.logtail import read_log
from reconciler.node.loop import ReconcileLoop, RunInfo
from reconciler.node.recovery import Recovery
from reconciler.node.rollout_gate import RolloutGate
from reconciler.node.runtimes.base import ALIVE_STATES, Runtime
from reconciler.node.runtimes.process import ProcessRuntime
from reconciler.node.sdnotify import SdNotifier
from reconciler.node.source import GitSource, SignatureVerifier
from reconciler.node.status_view import StatusView
from reconciler.node.store import Store, StoreWriteError
from reconciler.node.supervision import Supervision
from reconciler.node.telemetry import Telemetry
from reconciler.node.transitions import transition

if TYPE_CHECKING:
    from reconciler.node.schedule import Schedule

log = logging.getLogger(__name__)

__all__ = ["Agent", "AgentConfig", "RunInfo", "StateDirBusy"]


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
    # with signature checks: allow moving back to an ancestor of the applied revision
    allow_rewind: bool = False


class StateDirBusy(Exception):
    """Another agent runs with this state dir."""


class Agent:
    """One node's agent. Implements core.ports.AgentAPI for the mesh."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        runtime: Runtime | None = None,
        telemetry: Telemetry | None = None,
        notifier: Any = None,
        coordinator: RolloutCoordinator | None = None,
    ) -> None:
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
        # for `status --state-dir` while the agent is down
        startup_store_error = None
        try:
            self.store.update_meta(node_id=config.node_id, labels=self.labels,
                                   agent_version=__version__)
        except StoreWriteError as exc:  # a full disk must not keep the agent from starting
            log.error("%s: node meta not updated", exc)
            startup_store_error = str(exc)
        verifier = None
        if config.allowed_signers or config.gpg_keyring:
            verifier = SignatureVerifier(allowed_signers=config.allowed_signers,
                                         gpg_keyring=config.gpg_keyring)
        self.source = GitSource(config.repo_url, config.branch, state_dir / "source",
                                fetch_timeout=config.fetch_timeout, verifier=verifier)
        self.artifacts = ArtifactStore(state_dir / "apps")
        self.supervision = Supervision(self.store, self.record, self._notify_soon,
                                       workdir=state_dir, port_offset=config.port_offset)
        if runtime is None:
            runtime = ProcessRuntime(self.supervision)
        self.runtime = runtime
        self.supervision.attach(runtime)
        self.monitor = self.supervision.monitor
        self.telemetry = telemetry or Telemetry(config.node_id, agent_version=__version__)
        self.executor = Executor(
            node_id=config.node_id, store=self.store, runtime=self.runtime,
            artifacts=self.artifacts, hooks=self.supervision, log_dir=state_dir / "logs",
            port_offset=config.port_offset, telemetry=self.telemetry,
        )
        self.recovery = Recovery(
            node_id=config.node_id, store=self.store, runtime=self.runtime,
            executor=self.executor, watch=self.supervision.watch,
            apps_root=self.artifacts.root,
        )
        self.loop = ReconcileLoop(
            settings=config, store=self.store, source=self.source, executor=self.executor,
            telemetry=self.telemetry, record=self.record, notify=self._notify_soon,
            current_state=self._current_state, now=self._now, labels=lambda: self.labels,
            settled=self.recovery.settled,
        )
        self.loop.on_run_done = self._run_done
        self.loop.store_error = startup_store_error
        self.rollout = RolloutGate(
            node_id=config.node_id, labels=lambda: self.labels, store=self.store,
            source=self.source, trigger=self.trigger, notify=self._notify_soon, now=self._now,
        )
        self.rollout.coordinator = coordinator
        self.rollout.current_run = lambda: self.loop.current_run
        self.loop.gate = self.rollout
        self.view = StatusView(
            store=self.store, runtime=self.runtime, supervision=self.supervision,
            labels=lambda: self.labels, node_facts=self.store.node_meta,
            run_facts=self.loop.run_facts, desired=lambda: self.loop.desired, now=self._now,
        )
        self.view.rollout_note = lambda: self.rollout.note
        self.telemetry.set_phases(self.view.phase_counts())
        self.notifier = SdNotifier.from_env() if notifier is None else notifier
        self._listeners: list[Callable[[], None]] = []
        self._notify_scheduled = False
        self._aio: asyncio.AbstractEventLoop | None = None
        self._schedule: Schedule | None = None
        self._ready_sent = False
        self._closed = False

    @property
    def coordinator(self) -> RolloutCoordinator | None:
        """The fleet rollouts' coordinator (the mesh's; None without NATS: a revision that
        rollout.yaml governs is then held as not enforceable)."""
        return self.rollout.coordinator

    @coordinator.setter
    def coordinator(self, coordinator: RolloutCoordinator | None) -> None:
        self.rollout.coordinator = coordinator

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, first_reconcile: bool = True, schedule: bool = True) -> None:
        """Adopt what a previous agent left running, start the poll schedule (unless not
        `schedule`: --once) and (by default) the first reconcile. Returns at once;
        reconciles run in the background."""
        self._aio = asyncio.get_running_loop()
        try:
            with self.store.transaction():
                self.record("node.started", message=f"agent {__version__} started")
        except StoreWriteError as exc:  # a full disk: start anyway, say why, retry later
            log.error("%s: the node.started event is not recorded", exc)
            self.loop.store_error = str(exc)
        await self.recovery.adopt_all()
        self.loop.start()
        if schedule:
            self._start_scheduler()
        if first_reconcile:
            self.trigger("startup")

    def _start_scheduler(self) -> None:
        # Imported here, as APScheduler (~50 ms) is only for a serving agent, not `node --once`.
        from reconciler.node.schedule import Schedule

        assert self._aio is not None
        interval = max(self.config.interval, 0.05)
        schedule = Schedule(self._aio)
        schedule.every("poll", lambda: self.trigger("poll"), interval,
                       jitter=interval * self.config.jitter)
        schedule.every("heartbeat", self._heartbeat, self._heartbeat_period())
        schedule.start()
        self._schedule = schedule

    def _heartbeat_period(self) -> float:
        period = self.config.heartbeat
        watchdog = self.notifier.watchdog_interval() if self.notifier else None
        if watchdog:
            period = min(period, watchdog / 2)
        return max(period, 0.05)

    def _heartbeat(self) -> None:
        """Feed the systemd watchdog while the loop makes progress; refresh observers."""
        if self.notifier and not self.loop.stuck():
            self.notifier.watchdog()
        self._notify_soon()

    def _run_done(self, info: RunInfo) -> None:
        if not self._ready_sent and self.notifier:
            self._ready_sent = True
            self.notifier.ready(f"first reconcile: {info.outcome}")
        if self.notifier and getattr(self.notifier, "enabled", True):
            self.notifier.status(self.view.summary_line())

    async def close(self, stop_apps: bool = False) -> None:
        """Stop reconciling. Apps keep running (the next agent adopts them) unless
        `stop_apps`: then they stop, dependents first."""
        if self._closed:
            return
        self._closed = self.supervision.closed = True
        if self.notifier:
            self.notifier.stopping("stopping")
        if self._schedule is not None:
            self._schedule.shutdown()
        self.rollout.close()
        await self.loop.close()
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
        specs = {name: self.store.spec_of(r) for name, r in self.store.apps().items()}
        try:
            return DependencyGraph.from_apps(specs).removal_order(list(specs))
        except Exception:  # a broken graph must not keep apps running: stop all at once
            return [sorted(specs)]

    @property
    def reconciling(self) -> bool:
        return self.loop.reconciling

    # -- events ---------------------------------------------------------------------------
    def record(self, type: EventType, **fields: Any) -> Event:
        """Queue an event (joins the caller's store transaction) and wake observers."""
        fields.setdefault("revision", self.loop.current_revision
                          or self.store.node_meta().applied_revision)
        fields.setdefault("run_id", self.loop.current_run)
        fields.setdefault("trace_id", self.telemetry.trace_id())
        event = make_event(type, self.node_id, self._now(), **fields)
        self.store.add_event(event)
        level = logging.WARNING if event.outcome == "failure" else logging.INFO
        log.log(level, "%s%s%s", type, f" {event.app}" if event.app else "",
                f": {event.message}" if event.message else "",
                extra={"event": type, "app": event.app, "run_id": event.run_id})
        self._notify_soon()
        return event

    # -- AgentAPI -------------------------------------------------------------------------
    def add_listener(self, on_change: Callable[[], None]) -> None:
        self._listeners.append(on_change)

    def _notify_soon(self) -> None:
        if self._notify_scheduled or self._aio is None or self._aio.is_closed():
            return
        self._notify_scheduled = True
        self._aio.call_soon(self._notify)

    def _notify(self) -> None:
        self._notify_scheduled = False
        self.telemetry.set_phases(self.view.phase_counts())
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("status listener failed")

    def trigger(self, reason: str) -> str:
        return self.loop.trigger(reason)

    async def wait_run(self, run_id: str) -> RunInfo:
        return await self.loop.wait_run(run_id)

    async def reconcile_now(self, reason: str = "manual") -> RunInfo:
        return await self.wait_run(self.trigger(reason))

    def status(self) -> NodeStatus:
        return self.view.status()

    def state(self) -> dict[str, Any]:
        return self.view.state(self.node_id)

    async def plan(self) -> Plan:
        return await self.loop.plan()

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
                result[name] = self.view.status_of(record).health
        return result

    async def suspend(self, app: str | None = None) -> None:
        await self._set_suspended(app, True)

    async def resume(self, app: str | None = None) -> None:
        await self._set_suspended(app, False)
        self.trigger("resume")

    def reconfigure(self, *, labels: dict[str, str], interval: float, changed: list[str],
                    message: str) -> None:
        """A reloaded node config (SIGHUP): new labels and poll interval; apps are not touched.
        `changed` (option names, never values) and `message` go into node.reconfigured."""
        relabelled = labels != self.labels
        self.labels = self.config.labels = dict(labels)
        if interval != self.config.interval:
            self.config.interval = interval
            if self._schedule is not None:
                self._schedule.reschedule("poll", interval, jitter=interval * self.config.jitter)
        with self.store.transaction():
            self.store.update_meta(labels=self.labels)
            self.record("node.reconfigured", outcome="success", message=message,
                        data={"changed": changed})
        if relabelled:  # the labels pick the apps: see what they pick now
            self.trigger("reconfigured")

    async def logs(self, app: str, lines: int, cursor: str | None = None) -> dict[str, Any]:
        chunk = await asyncio.to_thread(
            read_log, Path(self.config.state_dir) / "logs", app, lines, cursor)
        return chunk.to_json(self.node_id, app)

    async def _set_suspended(self, app: str | None, suspended: bool) -> None:
        with self.store.transaction():
            if app is None:
                self.store.update_meta(suspended=suspended)
                log.info("node %s", "suspended" if suspended else "resumed")
            else:
                record = self.store.get_app(app)
                if record is None:
                    raise ValueError(f"unknown app {app!r}")
                changes: dict[str, Any] = {"suspended": suspended}
                if not suspended:
                    # resume is also how an operator asks to retry a spec that failed
                    changes.update(failed_spec_hash=None)
                transition(self.store, self.record, app, changes,
                           "app.suspended" if suspended else "app.resumed",
                           version=record.version)
        self._notify_soon()

    # -- facts ----------------------------------------------------------------------------
    def _now(self) -> datetime:
        return datetime.now(UTC)

    def _current_state(self) -> CurrentState:
        names = self.runtime.names()
        running = {name for name, record in self.store.apps().items()
                   if self.supervision.is_running(record, names)}
        alive = {name for name in names if self.runtime.state(name) in ALIVE_STATES}
        return self.store.current_state(running=running, alive=alive)


def _lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on <state>/agent.lock for the agent's lifetime: two agents on
    one state dir would adopt, restart and stop the same processes."""
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
