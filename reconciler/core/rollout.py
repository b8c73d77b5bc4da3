"""Fleet rollout decisions, pure: the rollout entry, and what happens to it. No I/O, no clock.

The entry (JSON in the `gitops_rollouts` KV bucket, key = full revision SHA) is the whole
state of one revision's rollout. Every change is a function here, entry (+ fleet, + `now`)
in, `Step(entry, events)` out; the mesh shell applies it with a compare-and-set and records
the events only when its write won, so each transition is announced once.

    new_entry ──▶ progressing ──pause──▶ paused ──resume──▶ progressing
                      │  advance: wave done + bake ─▶ next wave opens (rollout.wave-opened)
                      │  last wave done ───────────▶ complete (rollout.completed)
                      └─ failed > max_failed, abort, superseded ─▶ aborted (rollout.aborted)

Who may apply: `consult` (wave open, not paused/aborted, a max_unavailable slot free: the
node claims it). Who reports: `report` (synced / failed). Offline nodes (stale heartbeat)
are counted `offline`: they neither fail nor hold their wave, and join when they return.

Reports at scale: each node writes its outcome to its own key (`NodeReport`, key
`<sha>.<node>`, a plain put that waits for nobody) and the entry is *folded* from the
reports (`fold`) only when `fold_due` says the entry must change now: a failure (abort
within seconds), a node holding a max_unavailable slot (free it), a report that completes
the open wave (`wave_reported`), a late or unplaced node, or progress older than
`FOLD_EVERY_S`. So 100 nodes of a 100% wave cost a handful of compare-and-sets, not 100
contending ones.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from reconciler.core.events import iso_time, parse_time
from reconciler.core.rollout_spec import RolloutSpec, resolve_count
from reconciler.core.spec import Selector, format_duration

RolloutState = Literal["progressing", "paused", "complete", "aborted"]
ROLLOUT_STATES: tuple[str, ...] = ("progressing", "paused", "complete", "aborted")
ACTIVE_STATES = frozenset({"progressing", "paused"})
OPERATOR_ACTIONS: tuple[str, ...] = ("pause", "resume", "abort", "promote")
RolloutEventType = Literal[
    "rollout.wave-opened", "rollout.completed", "rollout.aborted", "rollout.paused",
    "rollout.resumed",
]
ROLLOUT_EVENT_TYPES: tuple[str, ...] = RolloutEventType.__args__  # type: ignore[attr-defined]
_EVENT_NAMESPACE = uuid.UUID("5b1c4a52-6f0e-4d8c-9d6e-2f7e0c1a9b31")


class RolloutRefused(ValueError):
    """An operator action that does not apply to the entry as it is (message says why)."""


class WaveEntry(BaseModel):
    # defer_build (here and below): built on first use; a node outside any rollout and
    # `node --once` never validate these, so their start does not pay the schema build.
    model_config = ConfigDict(extra="ignore", defer_build=True)

    name: str
    selector: Selector = Field(default_factory=Selector)
    max_unavailable: int | str = "100%"
    nodes: list[str] = Field(default_factory=list)
    synced: list[str] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)
    offline: list[str] = Field(default_factory=list)
    opened_at: str | None = None
    synced_at: str | None = None  # every online node done: the bake started
    baked_at: str | None = None   # the bake ended (or was skipped) and the next wave opened

    def pending(self) -> list[str]:
        done = {*self.synced, *self.failed, *self.offline}
        return [n for n in self.nodes if n not in done]


class RolloutEntry(BaseModel):
    """One revision's rollout, as stored in gitops_rollouts."""

    model_config = ConfigDict(extra="ignore", defer_build=True)

    revision: str
    state: RolloutState = "progressing"
    wave: str | None = None  # the open wave's name
    wave_index: int = 0
    waves: list[WaveEntry]
    applying: dict[str, str] = Field(default_factory=dict)  # node -> since (ISO)
    failures: dict[str, str] = Field(default_factory=dict)  # node -> why
    reason: str = ""
    base: str | None = None  # the last completed revision (what `revert` goes back to)
    bake_s: float = 0.0
    progress_deadline_s: float = 600.0
    max_failed: int | str = 0
    revert: bool = True
    superseded_by: str | None = None
    created_at: str
    updated_at: str
    transitions: int = 0  # counts announced transitions (deterministic event ids)
    # every wave's nodes known (a fleet read placed them): only then do waves open, so a
    # wave is never taken for empty before its nodes are known
    placed: bool = True

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> RolloutEntry:
        return cls.model_validate_json(data)

    def targeted(self) -> list[str]:
        return sorted({n for w in self.waves for n in w.nodes})

    def failed_nodes(self) -> list[str]:
        return sorted({n for w in self.waves for n in w.failed})

    def done_nodes(self) -> set[str]:
        """Nodes that applied the revision (synced or failed at it)."""
        return {n for w in self.waves for n in (*w.synced, *w.failed)}

    def max_failed_count(self) -> int:
        return resolve_count(self.max_failed, len(self.targeted()), at_least_one=False)

    def wave_of(self, labels: Mapping[str, str]) -> int:
        for index, wave in enumerate(self.waves):
            if wave.selector.matches(dict(labels)):
                return index
        return len(self.waves) - 1


@dataclass(frozen=True)
class Member:
    """What the fleet says about one node: its labels, whether its heartbeat is fresh, and
    the revisions its status names (applied, desired). `revisions` empty: not known."""

    labels: Mapping[str, str]
    online: bool = True
    revisions: tuple[str, ...] = ()
    # one of `revisions` is an earlier commit of the rollout's revision (the shell asked
    # git): a node still at a superseded revision, or at one that never had a rollout
    same_history: bool = False

    def concerns(self, entry: RolloutEntry) -> bool:
        """Is this node part of the entry's rollout? It is when it wants the revision, still
        runs the rollout's base, or runs an earlier commit of the revision's history: nodes
        of the same repository. Nodes following other repositories or branches (never at
        those revisions) neither join nor hold a wave."""
        if not self.revisions or self.same_history:
            return True
        wanted = {entry.revision, *([entry.base] if entry.base else [])}
        return not wanted.isdisjoint(self.revisions)


# how many distinct revisions of a fleet read are traced in git per rollout revision (a
# bucket shared by many repositories must not cost a git call per node)
MAX_TRACED_REVISIONS = 32


def revisions_to_trace(members: Mapping[str, Member], revision: str,
                       traced: Collection[str]) -> list[str]:
    """The revisions nodes run or want, other than `revision` and those already `traced`,
    most common first, at most MAX_TRACED_REVISIONS: the shell asks git which of them are
    earlier commits of `revision` (so those nodes are of the rollout's repository)."""
    counts: dict[str, int] = {}
    for member in members.values():
        for seen in member.revisions:
            if seen and seen != revision and seen not in traced:
                counts[seen] = counts.get(seen, 0) + 1
    ranked = sorted(counts, key=lambda r: (-counts[r], r))
    return ranked[:MAX_TRACED_REVISIONS]


def with_history(members: Mapping[str, Member], earlier: Collection[str]
                 ) -> dict[str, Member]:
    """`members`, those running or wanting one of the `earlier` commits marked same_history."""
    found = set(earlier)
    return {node: replace(m, same_history=True)
            if found and not m.same_history and not found.isdisjoint(m.revisions) else m
            for node, m in members.items()}


@dataclass(frozen=True)
class RolloutEvent:
    type: RolloutEventType
    message: str
    id: str
    revision: str  # the rollout's (a consult of a new revision may end an older one)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """An entry after a change, and the events the change announces (if its write wins)."""

    entry: RolloutEntry
    events: tuple[RolloutEvent, ...] = ()


VerdictKind = Literal["apply", "wait", "aborted", "superseded"]


@dataclass(frozen=True)
class Verdict:
    """What a node does about a governed revision.

    apply: go ahead (claimed a slot, or applied it already, or the rollout completed).
    wait: keep running what runs; `message` names what it waits for; check again in
      `recheck_in` seconds (bake end, a deadline) or when the entry changes.
    aborted: never start the revision; with `revert`, a node that applied it goes back to
      `base`. superseded: a newer commit took over; do nothing for this one.
    """

    kind: VerdictKind
    message: str = ""
    base: str | None = None
    revert: bool = False
    recheck_in: float | None = None
    state: RolloutState = "progressing"  # the entry's state when the verdict was made


# ---- building and advancing ----------------------------------------------------------------

def new_entry(revision: str, spec: RolloutSpec, base: str | None, now: datetime,
              placed: bool = True) -> RolloutEntry:
    """A fresh rollout: the first wave open at `now`. `placed=False`: created before the
    fleet was read (no wave opens until an advance with the fleet places its nodes)."""
    at = iso_time(now)
    waves = [WaveEntry(name=w.name, selector=w.nodes, max_unavailable=w.max_unavailable)
             for w in spec.waves]
    waves[0].opened_at = at
    return RolloutEntry(
        revision=revision, wave=waves[0].name, waves=waves, base=base, bake_s=spec.bake,
        progress_deadline_s=spec.progress_deadline, max_failed=spec.max_failed,
        revert=spec.revert, created_at=at, updated_at=at, placed=placed,
    )


def base_for(previous: RolloutEntry | None, previous_revision: str | None) -> str | None:
    """The revision a revert of the next rollout goes back to: the last completed one.
    A previous revision without an entry had no rollout.yaml: it applied everywhere at once,
    which counts as completed."""
    if previous is None:
        return previous_revision
    return previous.revision if previous.state == "complete" else previous.base


def _event(e: RolloutEntry, type: RolloutEventType, message: str, **data: Any
           ) -> RolloutEvent:
    e.transitions += 1
    event_id = uuid.uuid5(_EVENT_NAMESPACE, f"{e.revision}:{e.transitions}:{type}").hex
    return RolloutEvent(type, message, event_id, e.revision, data)


def _place(e: RolloutEntry, node: str, wave: int) -> None:
    """Put `node` in wave `wave` (moving its lists along if its labels moved it)."""
    target = e.waves[wave]
    if node in target.nodes:
        return
    for other in e.waves:
        if node in other.nodes:
            for name in ("nodes", "synced", "failed", "offline"):
                values: list[str] = getattr(other, name)
                if node in values:
                    values.remove(node)
                    if name != "nodes":
                        getattr(target, name).append(node)
    target.nodes.append(node)
    target.nodes.sort()


def _place_all(e: RolloutEntry, members: Mapping[str, Member]) -> None:
    where = {n: i for i, w in enumerate(e.waves) for n in w.nodes}
    waves_of: dict[tuple[tuple[str, str], ...], int] = {}  # many nodes share their labels
    for node in sorted(members):
        member = members[node]
        current = where.get(node)
        if current is None and not member.concerns(e):
            continue
        key = tuple(sorted(member.labels.items()))
        wave = waves_of.get(key)
        if wave is None:
            wave = waves_of[key] = e.wave_of(member.labels)
        if current != wave:
            _place(e, node, wave)
    for wave_entry in e.waves:
        offline = {n for n in wave_entry.offline if n not in members}  # no news: keep
        offline |= {n for n in wave_entry.nodes if n in members and not members[n].online}
        done = {*wave_entry.synced, *wave_entry.failed}
        new = sorted(n for n in offline if n not in done)
        if new != wave_entry.offline:
            wave_entry.offline = new


def _expire(e: RolloutEntry, now: datetime) -> None:
    """A node applying longer than progress_deadline counts failed."""
    for node, since in sorted(e.applying.items()):
        started = parse_time(since)
        if started is None or (now - started).total_seconds() <= e.progress_deadline_s:
            continue
        del e.applying[node]
        wave = next((w for w in e.waves if node in w.nodes), e.waves[-1])
        if node not in wave.failed:
            wave.failed.append(node)
        if node in wave.synced:
            wave.synced.remove(node)
        e.failures[node] = (f"not synced within progress_deadline "
                            f"{format_duration(e.progress_deadline_s)}")


def _abort_if_too_many_failed(e: RolloutEntry, now: datetime) -> list[RolloutEvent]:
    failed = e.failed_nodes()
    allowed = e.max_failed_count()
    if len(failed) <= allowed:
        return []
    details = "; ".join(f"{n}: {e.failures.get(n, 'failed')}" for n in failed[:3])
    reason = (f"{len(failed)} node(s) failed, more than max_failed {e.max_failed}"
              + (f" ({allowed})" if isinstance(e.max_failed, str) else "") + f": {details}")
    return _set_aborted(e, reason[:500])


def _set_aborted(e: RolloutEntry, reason: str) -> list[RolloutEvent]:
    e.state, e.reason = "aborted", reason
    return [_event(e, "rollout.aborted", reason, wave=e.wave, base=e.base,
                   revert=e.revert, superseded_by=e.superseded_by)]


def _open_next(e: RolloutEntry, now: datetime, why: str) -> RolloutEvent:
    at = iso_time(now)
    e.waves[e.wave_index].baked_at = at
    e.wave_index += 1
    wave = e.waves[e.wave_index]
    wave.opened_at = at
    e.wave = wave.name
    return _event(e, "rollout.wave-opened", f"wave {wave.name} opened ({why})",
                  wave=wave.name, index=e.wave_index)


def _open_waves(e: RolloutEntry, now: datetime) -> list[RolloutEvent]:
    events: list[RolloutEvent] = []
    while e.state == "progressing":
        wave = e.waves[e.wave_index]
        if wave.pending():
            wave.synced_at = None  # someone (new, or back online) still has to apply
            return events
        if wave.synced_at is None:
            wave.synced_at = iso_time(now)
        if e.wave_index == len(e.waves) - 1:
            e.state, e.reason = "complete", ""
            e.wave = None
            synced = sum(len(w.synced) for w in e.waves)
            events.append(_event(e, "rollout.completed",
                                 f"every wave done: {synced} node(s) synced",
                                 synced=synced, failed=len(e.failed_nodes())))
            return events
        online = [n for n in wave.nodes if n not in wave.offline]
        baked = parse_time(wave.synced_at) or now
        if not online:
            events.append(_open_next(e, now, f"wave {wave.name} has no online node"))
        elif now >= baked + timedelta(seconds=e.bake_s):
            events.append(_open_next(e, now, f"wave {wave.name} synced and baked "
                                             f"{format_duration(e.bake_s)}"))
        else:
            return events
    return events


def advance(entry: RolloutEntry, members: Mapping[str, Member], now: datetime,
            fleet: bool = True) -> Step:
    """Bring the entry up to date with the fleet and the clock: membership and offline
    nodes, progress deadlines, the abort rule, and waves whose bake is over. `fleet`:
    `members` is the whole fleet as read (False: only the nodes at hand)."""
    if entry.state in ("complete", "aborted"):
        return Step(entry)
    e = entry.model_copy(deep=True)
    _place_all(e, members)
    if fleet:
        e.placed = True
    _expire(e, now)
    events = _abort_if_too_many_failed(e, now)
    if e.state == "progressing" and e.placed:
        events += _open_waves(e, now)
    return _finish(entry, e, events, now)


def _finish(before: RolloutEntry, e: RolloutEntry, events: list[RolloutEvent],
            now: datetime) -> Step:
    if e == before:
        return Step(before)
    e.updated_at = iso_time(now)
    return Step(e, tuple(events))


# ---- a node's part ---------------------------------------------------------------------------

def consult(entry: RolloutEntry, node: str, members: Mapping[str, Member], now: datetime,
            fleet: bool = True) -> tuple[Step, Verdict]:
    """May `node` apply the entry's revision now? Claims a max_unavailable slot when it may.
    `members` must include `node` itself; `fleet`: they are the whole fleet as read."""
    step = advance(entry, members, now, fleet)
    e = step.entry
    if e.state == "aborted":
        if e.superseded_by:
            return step, Verdict("superseded", f"superseded by {e.superseded_by[:12]}",
                                 state=e.state)
        return step, Verdict("aborted", f"rollout of {e.revision[:12]} aborted: {e.reason}",
                             base=e.base, revert=e.revert, state=e.state)
    if e.state == "complete" or node in e.done_nodes() or node in e.applying:
        return step, Verdict("apply", state=e.state)
    index = e.wave_of(members[node].labels) if node in members else len(e.waves) - 1
    wave = e.waves[index]
    if e.state == "paused":
        return step, Verdict("wait", f"rollout of {e.revision[:12]} paused: "
                                     f"{e.reason or 'by an operator'} (wave {wave.name})",
                             state=e.state)
    if index > e.wave_index:
        return step, Verdict("wait", f"waiting for wave {wave.name} of rollout "
                                     f"{e.revision[:12]} ({describe_open(e, now)})",
                             recheck_in=recheck_in(e, now))
    # a percentage is of the wave's online nodes (offline ones are not applying anything)
    online = [n for n in wave.nodes if n not in wave.offline]
    limit = resolve_count(wave.max_unavailable, len(online), at_least_one=True)
    if _everyone(wave.max_unavailable):
        # "everyone at once": no slot to count, so nothing is written for this node now (a
        # big wave's nodes do not all race for the entry just to start: its report places
        # it; progress_deadline does not apply to them, their start_timeout and rollback
        # still do). Only what the others' and the clock's news changed is kept.
        others = {n: m for n, m in members.items() if n != node}
        kept = step if node in entry.waves[index].nodes else advance(entry, others, now, fleet)
        return kept, Verdict("apply", state=e.state)
    busy = sorted(n for n in e.applying if n in wave.nodes)
    if len(busy) >= limit:
        return step, Verdict("wait", f"wave {wave.name} of rollout {e.revision[:12]}: no slot "
                                     f"free ({len(busy)} applying, max_unavailable "
                                     f"{wave.max_unavailable})", recheck_in=recheck_in(e, now))
    claimed = e.model_copy(deep=True)
    claimed.applying[node] = iso_time(now)
    claimed.updated_at = iso_time(now)
    return Step(claimed, step.events), Verdict("apply")


def _everyone(max_unavailable: int | str) -> bool:
    return isinstance(max_unavailable, str) and float(max_unavailable.rstrip("%")) >= 100


NodeOutcome = Literal["synced", "failed"]
# progress (synced counts) reaches the entry at least this often while reports come in; the
# transitions (a failure, a freed slot, a completed wave) reach it at once
FOLD_EVERY_S = 2.0


class NodeReport(BaseModel):
    """One node's outcome at a revision, as its report key `<sha>.<node>` holds it."""

    model_config = ConfigDict(extra="ignore", defer_build=True)

    node: str
    outcome: NodeOutcome
    message: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    at: str  # when the node reported (its clock; a slot claimed later makes it stale)

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> NodeReport:
        return cls.model_validate_json(data)


def report(entry: RolloutEntry, node: str, outcome: NodeOutcome, message: str,
           members: Mapping[str, Member], now: datetime) -> Step:
    """`node` applied the revision: synced, or failed (why in `message`); then advance."""
    e = entry.model_copy(deep=True)
    _take_report(e, node, outcome, message, members)
    if e == entry:
        return advance(entry, members, now)
    e.updated_at = iso_time(now)
    return advance(e, members, now)


def fold(entry: RolloutEntry, reports: Mapping[str, NodeReport],
         members: Mapping[str, Member], now: datetime, fleet: bool = False) -> Step:
    """The entry with every node's report taken in (idempotent: a report already in
    changes nothing), then advanced once. A report older than the node's slot claim is
    from before that claim and is left out. `members`: what is known of the fleet (the
    reports' own labels are added for their nodes)."""
    e = entry.model_copy(deep=True)
    known = {**members}
    for node in sorted(reports):
        got = reports[node]
        known.setdefault(node, Member(dict(got.labels), True))
        claimed = parse_time(e.applying.get(node))
        reported = parse_time(got.at)
        if claimed is not None and reported is not None and reported < claimed:
            continue
        _take_report(e, node, got.outcome, got.message, known)
    if e != entry:
        e.updated_at = iso_time(now)
    step = advance(e, known, now, fleet)
    if step.entry == entry:
        return Step(entry)
    return step


def shows(entry: RolloutEntry, node: str, outcome: NodeOutcome) -> bool:
    """Does the entry already show `node` with `outcome` (its report folded in)?"""
    wave = next((w for w in entry.waves if node in w.nodes), None)
    if wave is None or node in entry.applying:
        return False
    return node in (wave.synced if outcome == "synced" else wave.failed)


FoldDue = Literal["own", "progress", "place"]
# an entry its creator has not placed by then (it crashed?) is placed by a reporter
PLACE_AFTER_S = 5.0


def fold_due(entry: RolloutEntry, node: str, outcome: NodeOutcome, now: datetime,
             every_s: float = FOLD_EVERY_S) -> FoldDue | None:
    """Must `node`, having written its report, change the entry now? "own": take its own
    report in (a failure: the abort rule; a slot to free; a late, unplaced or moved node).
    "progress": the entry's counts are older than `every_s`: take its own report in, and
    if that write wins, everybody's (of a herd that saw the same old entry one write wins,
    the others read it fresh and find nothing due). None: nothing now (but see
    `wave_reported`, which needs to know who else reported). "place": the entry's waves
    are still unplaced long after its creation: read the fleet and fold everybody's (the
    creator places them, and takes in the reports written before it did, normally)."""
    if shows(entry, node, outcome):
        return None
    if entry.state not in ACTIVE_STATES or outcome == "failed" or node in entry.applying:
        return "own"
    if not entry.placed:
        created = parse_time(entry.created_at)
        late = created is None or (now - created).total_seconds() >= PLACE_AFTER_S
        return "place" if late else None
    if node not in entry.waves[entry.wave_index].pending():
        return "own"
    written = parse_time(entry.updated_at)
    if written is None or (now - written).total_seconds() >= every_s:
        return "progress"
    return None


def wave_reported(entry: RolloutEntry, reported: Collection[str]) -> bool:
    """Has every node the open wave still waits for written a report? Then folding them
    completes the wave: whoever sees it folds. Of several nodes reporting last at once, each
    writes its report before it looks, so at least one of them sees all the others'."""
    if entry.state not in ACTIVE_STATES or not entry.placed:
        return False
    pending = entry.waves[entry.wave_index].pending()
    return bool(pending) and set(pending) <= set(reported)


def completing_folder(entry: RolloutEntry) -> str | None:
    """Of a herd of reporters that all see the open wave reported, the one that folds at
    once (the others look again a little later): the last of its pending nodes by name."""
    pending = entry.waves[entry.wave_index].pending()
    return max(pending) if pending else None


def _take_report(e: RolloutEntry, node: str, outcome: NodeOutcome, message: str,
                 members: Mapping[str, Member]) -> None:
    """Record `node`'s outcome in `e` (in place): in its wave's synced or failed list."""
    e.applying.pop(node, None)
    if node in members:
        _place(e, node, e.wave_of(members[node].labels))
    wave = next((w for w in e.waves if node in w.nodes), None)
    if wave is None:
        wave = e.waves[-1]
        wave.nodes.append(node)
        wave.nodes.sort()
    add, drop = (wave.synced, wave.failed) if outcome == "synced" else (wave.failed, wave.synced)
    if node not in add:
        add.append(node)
        add.sort()
    if node in drop:
        drop.remove(node)
    if node in wave.offline:
        wave.offline.remove(node)
    if outcome == "failed":
        e.failures[node] = message[:300] or "failed"
    else:
        e.failures.pop(node, None)


# ---- operators and newer commits --------------------------------------------------------------

def pause(entry: RolloutEntry, now: datetime, reason: str = "") -> Step:
    if entry.state != "progressing":
        raise RolloutRefused(f"cannot pause a rollout that is {entry.state}")
    e = entry.model_copy(deep=True)
    e.state, e.reason = "paused", reason or "paused by an operator"
    return _finish(entry, e, [_event(e, "rollout.paused", e.reason, wave=e.wave)], now)


def resume(entry: RolloutEntry, now: datetime) -> Step:
    if entry.state != "paused":
        raise RolloutRefused(f"cannot resume a rollout that is {entry.state}")
    e = entry.model_copy(deep=True)
    e.state, e.reason = "progressing", ""
    events = [_event(e, "rollout.resumed", "resumed by an operator", wave=e.wave)]
    events += _open_waves(e, now)
    return _finish(entry, e, events, now)


def abort(entry: RolloutEntry, now: datetime, reason: str = "") -> Step:
    if entry.state not in ACTIVE_STATES:
        raise RolloutRefused(f"cannot abort a rollout that is {entry.state}")
    e = entry.model_copy(deep=True)
    return _finish(entry, e, _set_aborted(e, reason or "aborted by an operator"), now)


def promote(entry: RolloutEntry, now: datetime) -> Step:
    """Open the next wave now, skipping the bake (and whatever the open wave still lacks)."""
    if entry.state not in ACTIVE_STATES:
        raise RolloutRefused(f"cannot promote a rollout that is {entry.state}")
    if entry.wave_index >= len(entry.waves) - 1:
        raise RolloutRefused(f"the last wave ({entry.waves[-1].name}) is open already")
    e = entry.model_copy(deep=True)
    events = [_open_next(e, now, "promoted by an operator")]
    if e.state == "progressing":
        events += _open_waves(e, now)
    return _finish(entry, e, events, now)


def supersede(entry: RolloutEntry, newer: str, now: datetime) -> Step:
    """A newer commit takes over an unfinished rollout: it ends as aborted, `superseded_by`
    naming the newer revision (nodes following it do not revert for it)."""
    if entry.state not in ACTIVE_STATES:
        return Step(entry)
    e = entry.model_copy(deep=True)
    e.superseded_by = newer
    return _finish(entry, e, _set_aborted(e, f"superseded by {newer[:12]}"), now)


OPERATIONS = {"pause": pause, "resume": resume, "promote": promote}


def operate(entry: RolloutEntry, action: str, now: datetime, reason: str = "") -> Step:
    """One operator action by name (pause, resume, abort, promote)."""
    if action == "abort":
        return abort(entry, now, reason)
    if action == "pause":
        return pause(entry, now, reason)
    if action not in OPERATIONS:
        raise RolloutRefused(f"no rollout action {action!r}; use {', '.join(OPERATOR_ACTIONS)}")
    return OPERATIONS[action](entry, now)


# ---- reading an entry ----------------------------------------------------------------------------

def recheck_in(entry: RolloutEntry, now: datetime) -> float | None:
    """Seconds until the entry may change by the clock alone (a bake ends, a progress
    deadline passes), or None."""
    if entry.state != "progressing":
        return None
    times: list[datetime] = []
    wave = entry.waves[entry.wave_index]
    synced = parse_time(wave.synced_at)
    if synced is not None:
        times.append(synced + timedelta(seconds=entry.bake_s))
    for since in entry.applying.values():
        started = parse_time(since)
        if started is not None:
            times.append(started + timedelta(seconds=entry.progress_deadline_s))
    if not times:
        return None
    return max(0.0, (min(times) - now).total_seconds())


def bake_left(entry: RolloutEntry, now: datetime) -> float | None:
    """Seconds of bake left on the open wave (None when it is not baking)."""
    if entry.state not in ACTIVE_STATES:
        return None
    synced = parse_time(entry.waves[entry.wave_index].synced_at)
    if synced is None:
        return None
    return max(0.0, (synced + timedelta(seconds=entry.bake_s) - now).total_seconds())


def describe_open(entry: RolloutEntry, now: datetime) -> str:
    """e.g. 'wave canary open: 1/1 synced, baking 3s left'."""
    wave = entry.waves[entry.wave_index]
    text = f"wave {wave.name} open: {len(wave.synced)}/{len(wave.nodes)} synced"
    left = bake_left(entry, now)
    if left is not None:
        text += f", baking {left:.0f}s left"
    return text


def wave_rows(entry: RolloutEntry, now: datetime) -> list[dict[str, Any]]:
    """One row per wave for tables, the console and `wait`'s progress lines."""
    rows = []
    for index, wave in enumerate(entry.waves):
        if index < entry.wave_index or entry.state == "complete":
            phase = "done"
        elif index == entry.wave_index:
            phase = "open"
        else:
            phase = "waiting"
        applying = sorted(n for n in entry.applying if n in wave.nodes)
        left = bake_left(entry, now) if index == entry.wave_index else None
        rows.append({
            "name": wave.name, "phase": phase, "max_unavailable": wave.max_unavailable,
            "nodes": len(wave.nodes), "synced": len(wave.synced), "failed": len(wave.failed),
            "offline": len(wave.offline), "applying": len(applying),
            "pending": len(wave.pending()),
            "opened_at": wave.opened_at, "synced_at": wave.synced_at,
            "baked_at": wave.baked_at,
            "bake_left_s": None if left is None else round(left, 1),
        })
    return rows


def progress_line(entry: RolloutEntry, now: datetime) -> str:
    """e.g. 'abc123456789 progressing: canary 1/1 synced (baking 3s) | fleet 0/2'."""
    parts = []
    for row in wave_rows(entry, now):
        text = f"{row['name']} {row['synced']}/{row['nodes']}"
        extras = [f"{row[k]} {k}" for k in ("applying", "failed", "offline") if row[k]]
        if row["bake_left_s"] is not None:
            extras.append(f"baking {row['bake_left_s']:.0f}s")
        if row["phase"] == "waiting":
            extras.append("waiting")
        parts.append(text + (f" ({', '.join(extras)})" if extras else ""))
    line = f"{entry.revision[:12]} {entry.state}: " + " | ".join(parts)
    return line + (f" — {entry.reason}" if entry.reason else "")


# ---- the seam the agent uses ----------------------------------------------------------------

class RolloutUnavailable(Exception):
    """The rollout state cannot be read or written (no NATS, bucket missing, timeout)."""


# which of some revisions are earlier commits of the rollout's revision (the node's git)
History = Callable[[list[str]], set[str]]


class RolloutCoordinator(Protocol):
    """What the agent needs for a governed revision; the mesh implements it over KV."""

    async def consult(self, revision: str, spec: RolloutSpec, node: str,
                      labels: Mapping[str, str], previous: str | None,
                      later: Any = None, history: History | None = None
                      ) -> tuple[Verdict, tuple[RolloutEvent, ...]]:
        """May this node apply `revision` now? Creates the entry if this is the first node
        to see the revision (`previous`: the revision it followed before, for the base).
        Returns the verdict and the events this node's write caused (to record once);
        `later(events)` gets those of work it left running (placing a new entry's waves);
        `history(revisions)`: which of them are earlier commits of `revision` (git;
        blocking), so that nodes still at one of them join the rollout. Raises
        RolloutUnavailable."""

    async def report(self, revision: str, node: str, labels: Mapping[str, str],
                     outcome: NodeOutcome, message: str, later: Any = None
                     ) -> tuple[RolloutEntry | None, tuple[RolloutEvent, ...]]:
        """The node applied `revision` (its report key, folded into the entry when that
        is due; `later(events)` as for consult). Raises RolloutUnavailable."""

    async def supersede(self, previous: str | None, revision: str
                        ) -> tuple[RolloutEvent, ...]:
        """The node moved on from `previous` to `revision` (which has no rollout.yaml): an
        unfinished rollout of `previous` ends as superseded. Raises RolloutUnavailable."""

    def watch(self, revision: str | None, on_change: Any) -> None:
        """Call `on_change(state)` (on the loop) for the entry of `revision` and whenever it
        changes; None stops watching."""
