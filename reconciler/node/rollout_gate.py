"""The node's rollout gate (rollout.yaml, issue #9): may this node apply the fetched revision?

One step of the reconcile loop, between fetch and load. Without a rollout.yaml at the
revision: yes (every node at once, as before). With one, the RolloutCoordinator (the mesh's,
injected by the composition root) decides: the node's wave open, not paused or aborted, a
max_unavailable slot free. A node that may not apply keeps running what it runs and reports
`progressing` with the wave it waits for; it looks again when the rollout entry changes (the
coordinator's watch) or when the bake ends (a timer), never in a busy loop. After applying,
it reports synced / failed into the entry. On abort, a node that applied the revision goes
back to the last completed revision (with `revert`) and stays there on later polls: only a
new commit starts a new rollout. A node that cannot read the rollout state (no NATS, NATS
down) does not apply a governed revision, and says so.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from reconciler.core.errors import ArtifactError
from reconciler.core.events import make_event
from reconciler.core.rollout import (
    NodeOutcome,
    RolloutCoordinator,
    RolloutEvent,
    RolloutUnavailable,
)
from reconciler.core.rollout_spec import (
    MAX_ROLLOUT_BYTES,
    ROLLOUT_FILE,
    RolloutSpec,
    parse_rollout,
)
from reconciler.node.source import GitSource
from reconciler.node.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateDecision:
    """Apply `revision` (the fetched one, or the base a revert goes back to), or `hold`:
    the run's (outcome, message), nothing applied. `spec`: the rollout.yaml governing the
    fetched revision (the run's result is reported into its rollout). `news`: the reason
    for holding changed (the run records reconcile.started / .finished)."""

    revision: str | None
    hold: tuple[str, str] | None = None
    spec: RolloutSpec | None = None
    news: bool = False


class RolloutGate:
    def __init__(self, *, node_id: str, labels: Callable[[], dict[str, str]], store: Store,
                 source: GitSource, trigger: Callable[[str], str],
                 notify: Callable[[], None], now: Callable[[], datetime]) -> None:
        self.node_id = node_id
        self._labels = labels
        self.store = store
        self.source = source
        self._trigger = trigger
        self._notify = notify
        self._now = now
        self.coordinator: RolloutCoordinator | None = None
        self.current_run: Callable[[], str | None] = lambda: None
        self.note: tuple[str, str] | None = None  # (status, message) shown while held
        self._rules: tuple[str, RolloutSpec | None, list[str]] | None = None
        self._waiting = False
        self._state: str | None = None  # the entry's state at the last consult
        self._reported: tuple[str, str] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._failures = 0
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()

    # -- the step ---------------------------------------------------------------------------
    async def check(self, revision: str, previous: str | None) -> GateDecision:
        """`previous`: the desired revision before this fetch (the base of a new rollout)."""
        spec, problems = await self._file(revision)
        if spec is None and not problems:
            self.note, self._waiting = None, False
            if self.coordinator is not None:
                self.coordinator.watch(None, None)
                if previous is not None and previous != revision:
                    await self._supersede(previous, revision)
            return GateDecision(revision)
        short = revision[:12]
        if spec is None:
            return self._hold("degraded", f"{ROLLOUT_FILE} at {short} is invalid, so {short} "
                                          "is not applied: " + "; ".join(problems[:3]))
        if self.coordinator is None:
            return self._hold("degraded", f"{ROLLOUT_FILE} governs {short} but this node has no "
                                          "NATS configured: the rollout is not enforceable, so "
                                          f"{short} is not applied")
        meta = self.store.node_meta()
        if previous in (None, revision):
            previous = meta.applied_revision
        try:
            verdict, events = await self.coordinator.consult(
                revision, spec, self.node_id, self._labels(), previous,
                later=lambda events: None if self.closed else self._record(events),
                history=lambda revisions: self.source.ancestors_among(revision, revisions))
        except RolloutUnavailable as exc:
            self._failures += 1  # NATS not up yet, or away: look again soon
            self._recheck(min(5.0, 0.5 * 2 ** (self._failures - 1)))
            return self._hold("degraded", f"the rollout state of {short} cannot be read "
                                          f"({exc}): not enforceable, so {short} is not "
                                          "applied (retrying)")
        self._failures = 0
        self._record(events)
        self._state = verdict.state
        self.coordinator.watch(revision, self._on_change)
        if verdict.kind == "apply":
            self.note, self._waiting = None, False
            return GateDecision(revision, spec=spec)
        if verdict.kind == "wait":
            if verdict.recheck_in is not None:
                # a little jitter: the first node to wake opens the wave, the rest do not
                # all race for the same compare-and-set at the same instant
                self._recheck(verdict.recheck_in + random.uniform(0.01, 0.1))
            return self._hold("progressing", verdict.message, waiting=True)
        if verdict.kind == "superseded":
            return self._hold("progressing", f"{verdict.message}; polling for it")
        applied = meta.applied_revision
        if verdict.revert and verdict.base and revision in (applied, meta.rollout_reverted):
            if meta.rollout_reverted != revision:
                self.store.update_meta(rollout_reverted=revision)
            self.note = ("degraded", f"{verdict.message}; reverted to {verdict.base[:12]}")
            self._waiting = False
            return GateDecision(verdict.base)
        return self._hold("degraded", f"{verdict.message}; {short} not applied, staying at "
                                      f"{(applied or 'no revision')[:12]}")

    async def report(self, revision: str, outcome: tuple[str, str]) -> None:
        """Tell the rollout this node synced or failed at `revision` (once per change)."""
        kind: NodeOutcome = "synced" if outcome[0] == "success" else "failed"
        if self.coordinator is None or self._reported == (revision, kind):
            return
        try:
            entry, events = await self.coordinator.report(
                revision, self.node_id, self._labels(), kind, outcome[1],
                later=lambda events: None if self.closed else self._record(events))
        except RolloutUnavailable as exc:
            log.warning("rollout: could not report %s for %s: %s", kind, revision[:12], exc)
            self._recheck(5.0)
            return
        self._reported = (revision, kind)
        self._record(events)
        if entry is not None and entry.state == "aborted" and self._state != "aborted":
            self._state = entry.state
            self._trigger("rollout")  # this report aborted it: revert now

    # -- parts ------------------------------------------------------------------------------
    async def _file(self, revision: str) -> tuple[RolloutSpec | None, list[str]]:
        """rollout.yaml at `revision` (read once per revision, bounded): (spec, []), (None,
        problems), or (None, []) when the revision has none."""
        cached = self._rules
        if cached is not None and cached[0] == revision:
            return cached[1], cached[2]
        try:
            data = await asyncio.to_thread(self.source.read_file, revision, ROLLOUT_FILE,
                                           MAX_ROLLOUT_BYTES)
        except ArtifactError as exc:
            result: tuple[RolloutSpec | None, list[str]] = (
                (None, []) if "no such file" in str(exc) else (None, [str(exc)]))
        else:
            spec, found = parse_rollout(ROLLOUT_FILE, data)
            result = (spec, [str(p) for p in found])
        self._rules = (revision, *result)
        return result

    def _hold(self, state: str, message: str, waiting: bool = False) -> GateDecision:
        """Keep running what runs; the status says why. News when the reason changed, not
        when only its details did (the counts and the bake countdown in parentheses)."""
        before = self.note
        news = before is None or (before[0], before[1].split(" (")[0]) != (
            state, message.split(" (")[0])
        if news:
            log.info("rollout: %s", message)
        self.note, self._waiting = (state, message), waiting
        return GateDecision(None, hold=("skipped", message), news=news)

    async def _supersede(self, previous: str, revision: str) -> None:
        assert self.coordinator is not None
        try:
            events = await self.coordinator.supersede(previous, revision)
        except RolloutUnavailable as exc:  # best effort: the old entry only shows as stale
            log.debug("rollout: could not mark %s superseded: %s", previous[:12], exc)
            return
        self._record(events)

    def _recheck(self, delay: float) -> None:
        """Reconcile again in `delay` s (a bake ends, a deadline passes, NATS may be back)."""
        if self.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(delay, self._trigger, "rollout")

    def _on_change(self, state: str) -> None:
        """The entry changed: a waiting node looks again; so does every node when the
        rollout was aborted (the nodes that applied it revert). Other changes (a report,
        completion) need nothing from a node that is not waiting."""
        if self._waiting or (state == "aborted" and self._state != "aborted"):
            self._trigger("rollout")

    def _record(self, events: tuple[RolloutEvent, ...]) -> None:
        """Events of transitions this node's write caused (it won the CAS): once, via the
        outbox, with the transition's deterministic id, under its rollout's revision."""
        if not events:
            return
        with self.store.transaction():
            for event in events:
                self.store.add_event(make_event(
                    event.type, self.node_id, self._now(), event_id=event.id,
                    revision=event.revision, message=event.message,
                    data=event.data or None, run_id=self.current_run()))
                log.info("%s: %s", event.type, event.message)
        self._notify()
