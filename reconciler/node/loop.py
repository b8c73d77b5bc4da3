"""The reconcile loop: one run at a time, each a straight list of steps (fetch, load, plan, apply).

Runs are asked for by `trigger` (poll schedule, pushes, operators) and coalesce: at most one
runs and one waits. What a run records follows core.runs (the event policy, pure)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from reconciler.core.errors import ReconcileError, SignatureError, SourceError
from reconciler.core.events import Event, iso_time
from reconciler.core.loader import ParseCache, load_files
from reconciler.core.plan import Plan, make_plan
from reconciler.core.runs import QUIET_REASONS, RunSoFar, answers_with_finished, is_news
from reconciler.core.state import CurrentState, DesiredState, desired_for_node
from reconciler.core.states import STUCK_PHASES
from reconciler.core.status import RunFacts
from reconciler.node.executor import ActionResult, Executor
from reconciler.node.rollout_gate import GateDecision, RolloutGate
from reconciler.node.source import GitSource
from reconciler.node.store import Store, StoreWriteError
from reconciler.node.telemetry import Telemetry

log = logging.getLogger(__name__)

# A reconcile running longer than this is considered stuck: the systemd watchdog stops
# being fed so systemd can restart the agent (apps keep running and are adopted).
STUCK_AFTER = 900.0


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


class LoopSettings(Protocol):
    node_id: str
    labels: dict[str, str]
    branch: str
    apps_path: str
    interval: float
    jitter: float
    heartbeat: float
    allow_rewind: bool


class ReconcileLoop:
    def __init__(
        self, *, settings: LoopSettings, store: Store, source: GitSource, executor: Executor,
        telemetry: Telemetry, record: Callable[..., Event], notify: Callable[[], None],
        current_state: Callable[[], CurrentState], now: Callable[[], datetime],
        labels: Callable[[], dict[str, str]],
        settled: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.source = source
        self.executor = executor
        self.telemetry = telemetry
        self.record = record
        self._notify = notify
        self._current_state = current_state
        self._now = now
        self._labels = labels
        # until changes a crashed agent left half done are finished (Recovery.settled)
        self._settled = settled
        self.parse_cache = ParseCache()
        # after each run (the agent feeds systemd's READY/STATUS from it)
        self.on_run_done: Callable[[RunInfo], None] = lambda info: None
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        # a trigger during a run: the source may have moved (see _watch_source)
        self._news = asyncio.Event()
        self._pending: tuple[str, str] | None = None
        self._run_done: dict[str, asyncio.Future[RunInfo]] = {}
        self._worker: asyncio.Task[None] | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._source_failures = 0
        self._store_failures = 0
        self.store_error: str | None = None  # the last store write failed (a full disk)
        self.reconciling = False
        self.current_run: str | None = None  # the run whose events are being recorded
        self.current_revision: str | None = None  # the revision that run applies
        self.desired: DesiredState | None = None
        self.last = RunInfo()
        self.run: RunInfo | None = None
        self._so_far = RunSoFar(reason="")
        self._announced = False  # reconcile.started recorded for the current run
        # rollout.yaml: may this node apply the fetched revision now (node.rollout_gate)
        self.gate: RolloutGate | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = asyncio.create_task(self._work(), name=f"reconcile-{self.settings.node_id}")

    async def close(self) -> None:
        self.closed = True
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

    def stuck(self) -> bool:
        run = self.run
        return (run is not None and run.started_at is not None
                and time.monotonic() - run.started_at > STUCK_AFTER)

    def run_facts(self) -> RunFacts:
        shown = self.run or self.last
        return RunFacts(reconciling=self.reconciling, run_id=shown.run_id,
                        trace_id=shown.trace_id, heartbeat_interval_s=self.settings.heartbeat,
                        store_error=self.store_error)

    # -- asking for runs ------------------------------------------------------------------
    def trigger(self, reason: str) -> str:
        """Ask for a reconcile; at most one runs and one waits. Returns the run id that will
        cover this request (the queued one's when one is queued already). A queued poll
        takes the reason of a person's request it covers, so that run answers with events."""
        if self._pending is not None:
            run_id, queued = self._pending
            if queued in QUIET_REASONS and reason not in QUIET_REASONS:
                self._pending = (run_id, reason)
            return run_id
        run_id = uuid.uuid4().hex[:12]
        self._pending = (run_id, reason)
        self._wake.set()
        self._news.set()
        return run_id

    async def wait_run(self, run_id: str) -> RunInfo:
        """Until the reconcile `run_id` finished (for --once, tests and benchmarks)."""
        assert self._loop is not None
        if self.last.run_id == run_id:  # finished already
            return self.last
        if self.closed:
            return RunInfo(run_id=run_id, outcome="skipped", message="agent stopped")
        future = self._run_done.setdefault(run_id, self._loop.create_future())
        return await asyncio.shield(future)

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._pending is None:
                continue
            run_id, reason = self._pending
            self._pending = None
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

    # -- one run --------------------------------------------------------------------------
    async def _reconcile(self, run_id: str, reason: str) -> RunInfo:
        """One run: the steps, then reconcile.finished when core.runs says so. Status gets
        last_reconcile_at/_ms (kept in the store for `status --state-dir`) unless skipped."""
        self.current_run = run_id
        self.reconciling = True
        started = time.monotonic()
        info = self.run = RunInfo(run_id=run_id, started_at=started)
        meta = self.store.node_meta()
        self._so_far = RunSoFar(reason=reason, known_failure=meta.source_error,
                                desired_revision=meta.desired_revision,
                                applied_revision=meta.applied_revision)
        self._announced = False
        try:
            with self.telemetry.span("reconcile", node=self.settings.node_id, run_id=run_id,
                                     reason=reason):
                info.trace_id = self.telemetry.trace_id()
                if meta.suspended:
                    info.outcome, info.message = "skipped", "node suspended"
                    return info
                try:
                    outcome, message = await self._steps()
                    info.outcome, info.message = outcome, message
                    info.duration_ms = _ms(started)
                    info.finished_at = iso_time(self._now())
                    with self.store.transaction():
                        self.store.update_meta(last_reconcile_at=info.finished_at,
                                               last_reconcile_ms=info.duration_ms)
                        if answers_with_finished(self._announced, reason):
                            self.record("reconcile.finished", outcome=outcome,
                                        revision=self.store.node_meta().applied_revision,
                                        duration_ms=info.duration_ms, message=message or None,
                                        data={"reason": reason})
                except StoreWriteError as exc:
                    # nothing can be recorded (no event either): status says why, apps keep
                    # running as they are, and a retry picks up once there is room again
                    info.outcome, info.message = "failure", str(exc)
                    self._store_failed(exc)
                    return info
                if self.store_error is not None:
                    log.info("state store writable again")
                    self.store_error = None
                    self._store_failures = 0
                self.telemetry.reconcile_duration.record(
                    info.duration_ms / 1000, {"outcome": outcome}
                )
                return info
        finally:
            if info.finished_at is None:
                info.finished_at = iso_time(self._now())
            if info.duration_ms is None:
                info.duration_ms = _ms(started)
            self.last, self.run = info, None
            self.reconciling = False
            self.current_run = None
            self.current_revision = None
            self.on_run_done(info)
            self._notify()

    def _learnt(self, **facts: Any) -> None:
        """Add what the run just learnt; record reconcile.started the first time it is news,
        naming the revision it applies (none when the source failed)."""
        self._so_far = replace(self._so_far, **facts)
        if self._announced or not is_news(self._so_far):
            return
        self._announced = True
        with self.store.transaction():
            self.record("reconcile.started", revision=self._so_far.fetched,
                        message=self._so_far.reason)

    async def _steps(self) -> tuple[str, str]:
        """One pass (fetch, rollout gate, load, plan, apply), again when a newer revision
        cut it short (see _apply): the next pass goes through the same steps at that
        revision, the apps it changed first."""
        superseded: DesiredState | None = None
        while True:
            outcome, moved = await self._pass(superseded)
            if moved is None:
                return outcome
            log.info("revision %s superseded by %s mid-run; planning again",
                     (self.current_revision or "")[:12], moved[:12])
            superseded = self.desired

    async def _pass(self, superseded: DesiredState | None) -> tuple[tuple[str, str], str | None]:
        """(outcome, the newer revision that stopped this pass's plan early, if one did).
        `superseded`: the desired state of the pass that a newer revision cut short."""
        try:
            revision = await self.fetch()
        except (SourceError, SignatureError) as exc:
            # an unsigned or unreachable revision never becomes the desired one: the node
            # stays at its last good revision and reports the source problem
            self._learnt(source_failure=str(exc))
            return self._source_failed(exc, record=self._announced), None
        gate = await self._gate(revision)
        if gate.hold is not None:  # keep what runs; the status says why (rollout gate)
            if gate.news or revision != self._so_far.desired_revision:
                self._learnt(fetched=revision, has_work=True)
            self._fetched(revision)
            self._source_failures = 0
            self.store.update_meta(source_error=None)
            return gate.hold, None
        fetched, revision = revision, gate.revision or revision  # a revert: the base's tree
        # a revert that is done is no news on every poll (the fetched one stays desired)
        self._learnt(fetched=revision, **({"desired_revision": revision}
                                          if revision != fetched else {}))
        self._fetched(fetched)
        self._source_failures = 0
        self.current_revision = revision
        self._results: list[ActionResult] = []
        desired = self.desired
        if desired is None or desired.revision != revision:
            # only a new revision is read and loaded again: for the same one it cannot differ
            desired = await self.desired_state(revision)
        self.desired = desired
        first: set[str] = set()
        if superseded is not None:  # what the newer revision changed goes first
            first = {name for name, spec in desired.apps.items()
                     if superseded.apps.get(name) is not spec}
        spec_errors = tuple(str(p) for p in desired.problems)
        self.store.update_meta(spec_errors=spec_errors, source_error=None)
        if self._settled is not None:
            await self._settled()
        plan = make_plan(desired, self._current_state())
        if plan.actions or plan.metadata_only:
            self.store.check_writable()  # a change it cannot record must not start
        self._learnt(has_work=bool(plan.actions or plan.metadata_only))
        # a revision under a rollout (rollout.yaml) is applied whole: its waves pace the
        # revisions, and a pass cut short could leave the node half way, held at a gate
        moved = await self._apply(plan, desired, revision, first,
                                  watch=gate.spec is None and revision == fetched)
        if moved is not None:  # what started of this plan finished; the rest is planned again
            return ("success", ""), moved
        self._forget_abandoned_failures(desired)
        self.store.update_meta(applied_revision=revision)
        outcome = self._outcome(plan, self._results, spec_errors)
        self._learnt(failed=outcome[0] != "success")  # a held failure is news on every run
        if self.gate is not None and gate.spec is not None and revision == fetched:
            await self.gate.report(fetched, outcome)
        return outcome, None

    async def _gate(self, revision: str) -> GateDecision:
        if self.gate is None:
            return GateDecision(revision)
        return await self.gate.check(revision, self._so_far.desired_revision)

    async def _apply(self, plan: Plan, desired: DesiredState, revision: str,
                     first: set[str], watch: bool = True) -> str | None:
        """Carry the plan out while watching for a newer revision; that revision when one
        stopped the plan early (None: all of it ran). Results go to self._results."""
        moved: list[str] = []
        watcher = asyncio.create_task(
            self._watch_source(revision, moved) if watch else asyncio.sleep(0),
            name="source-news")
        try:
            self._results = await self.executor.apply(
                plan, desired.apps, lambda path: self.source.read_file(revision, path),
                superseded=lambda: bool(moved), first=first,
            )
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        return moved[0] if moved else None

    async def _watch_source(self, revision: str, moved: list[str]) -> None:
        """While a plan runs: on each trigger (poll schedule, gitops.source.changed, an
        operator), ask the remote for its tip (ls-remote, no fetch); a different one goes
        into `moved`, which stops the plan from starting further actions."""
        if self.source.pinned:
            return  # a tag or commit: the plan's revision is the one wanted
        while True:
            await self._news.wait()
            self._news.clear()
            try:
                remote = await asyncio.to_thread(self.source.remote_revision)
            except (SourceError, OSError):
                continue  # the next trigger asks again; this plan goes on meanwhile
            if remote is not None and remote != revision:
                moved.append(remote)
                return

    async def fetch(self) -> str:
        """ls-remote, then fetch only when the remote moved (GitSource.poll); then the
        signature check when one is configured. Raises SourceError / SignatureError."""
        self._news.clear()  # what was triggered before now, this fetch sees
        fetch_started = time.monotonic()
        revision = await asyncio.to_thread(self.source.poll)
        self.telemetry.fetch_duration.record(time.monotonic() - fetch_started)
        if self.source.verifier is not None:
            await asyncio.to_thread(
                self.source.verify_move, self.store.node_meta().applied_revision, revision,
                self.settings.allow_rewind,
            )
        return revision

    def _fetched(self, revision: str) -> None:
        """A new (verified) revision becomes the desired one."""
        if revision != self.store.node_meta().desired_revision:
            with self.store.transaction():
                self.store.update_meta(desired_revision=revision)
                self.record("source.fetched", revision=revision,
                            message=f"{self.settings.branch} at {revision[:12]}")

    async def desired_state(self, revision: str) -> DesiredState:
        apps_path = self.settings.apps_path
        files = await asyncio.to_thread(self.source.spec_files, revision, apps_path)
        result = await asyncio.to_thread(
            lambda: load_files(files, self.parse_cache, apps_path=apps_path)
        )
        return desired_for_node(result, self.settings.node_id, self._labels(), revision)

    async def plan(self) -> Plan:
        """What a run would do now; fetches but records nothing (a plan changes nothing)."""
        revision = await self.fetch()
        return make_plan(await self.desired_state(revision), self._current_state())

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

    def _outcome(self, plan: Plan, results: list[ActionResult],
                 spec_errors: tuple[str, ...]) -> tuple[str, str]:
        problems = [f"{r.action.app}: {r.message}" for r in results if r.outcome != "success"]
        acted = {r.action.app for r in results}
        # apps left failed by an earlier run (held by the planner) keep the run a failure
        problems += [
            f"{name}: {record.phase}: {record.message}"
            for name, record in self.store.apps().items()
            if name not in acted and record.phase in STUCK_PHASES
        ]
        if spec_errors:
            problems.insert(0, f"{len(spec_errors)} spec error(s): "
                               + "; ".join(spec_errors[:3]))
        if problems:
            return "failure", "; ".join(problems)
        changed = len(results)
        return "success", f"{changed} action(s)" if changed else "no changes"

    def _store_failed(self, exc: StoreWriteError) -> None:
        log.error("%s: changing nothing until it can be written", exc)
        self.store_error = str(exc)
        if self.closed or self._loop is None:
            return
        self._store_failures += 1
        delay = min(2.0 ** (self._store_failures - 1), max(self.settings.interval, 1.0))
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        self._retry_handle = self._loop.call_later(delay, self.trigger, "store retry")

    def _source_failed(self, exc: ReconcileError, record: bool) -> tuple[str, str]:
        """Keep running what runs; retry with backoff (signature problems wait for a poll).
        `record`: False for a repeat of the failure already reported (no source.failed)."""
        reason = str(exc)
        with self.store.transaction():
            self.store.update_meta(source_error=reason)
            if record:
                self.record("source.failed", outcome="failure", message=reason)
        if isinstance(exc, SourceError) and not self.closed and self._loop is not None:
            self._source_failures += 1
            delay = min(2.0 ** (self._source_failures - 1), max(self.settings.interval, 1.0))
            if self._retry_handle is not None:
                self._retry_handle.cancel()
            self._retry_handle = self._loop.call_later(delay, self.trigger, "source retry")
        return "failure", f"source: {reason}"


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
