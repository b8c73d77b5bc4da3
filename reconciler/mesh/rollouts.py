"""The rollouts KV shell: `gitops_rollouts` entries read, and changed only by compare-and-set.

Every change is get -> a pure function of reconciler.core.rollout -> a write that expects the
entry's KV revision (`Nats-Expected-Last-Subject-Sequence`; 0 = the key must not exist).
When another node or operator wrote in between, the server refuses the write (wrong last
sequence) and the change is computed again from the new value, so no update is lost. Only
the writer that won announces the transition's events: a node through its outbox (the
agent records them), the CLI and the console by publishing with Nats-Msg-Id.

A node's outcome goes first to its own report key `<sha>.<node>` (a plain put: a hundred
nodes reporting at once do not contend for one entry); it folds the reports into the entry
by CAS only when core's `fold_due` / `wave_reported` say the entry must change now.
Readers of the entries skip report keys (`is_report_key`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from reconciler.core.events import iso_time, make_event
from reconciler.core.rollout import (
    History,
    Member,
    NodeOutcome,
    NodeReport,
    RolloutEntry,
    RolloutEvent,
    RolloutRefused,
    RolloutUnavailable,
    Step,
    Verdict,
    advance,
    base_for,
    completing_folder,
    consult,
    fold,
    fold_due,
    new_entry,
    operate,
    revisions_to_trace,
    supersede,
    wave_reported,
    with_history,
)
from reconciler.core.rollout_spec import RolloutSpec
from reconciler.core.status import heartbeat_stale
from reconciler.mesh import provision
from reconciler.mesh.conn import NatsOptions, reason_of
from reconciler.mesh.subjects import (
    KV_STREAM,
    KV_SUBJECT_PREFIX,
    ROLLOUT_REPORT_TTL,
    ROLLOUTS_BUCKET,
    ROLLOUTS_STREAM,
    ROLLOUTS_SUBJECT_PREFIX,
    event_subject,
)

log = logging.getLogger("reconciler.mesh.rollouts")

CAS_ATTEMPTS = 200
OP_TIMEOUT_S = 5.0
FLEET_CACHE_S = 1.0
_WRONG_LAST = (10071, 10164)
_TTL_DISABLED = 10166  # "per-message TTL is disabled" on the stream
STATE_HEADER = "Gitops-Rollout-State"


@dataclass(frozen=True)
class CasResult:
    entry: RolloutEntry | None
    events: tuple[RolloutEvent, ...] = ()
    wrote: bool = False
    attempts: int = 1


async def rollouts_bucket(js: JetStreamContext, create: bool = True) -> KeyValue | None:
    """The bucket, verified against mesh.provision; created when missing and `create` (dev
    mode, as gitops_nodes is; with nats-config credentials only nats-init may create it)."""
    try:
        await provision.ensure(js, provision.rollouts_bucket(), create_missing=create)
    except nats.js.errors.NotFoundError:
        return None
    except provision.NotProvisioned as exc:
        log.warning("%s", exc)
        return None
    return await js.key_value(ROLLOUTS_BUCKET)


def report_key(revision: str, node: str) -> str:
    """`<sha>.<node>`: node names ([a-z0-9-]) and SHAs are valid KV key tokens."""
    return f"{revision}.{node}"


def is_report_key(key: str) -> bool:
    """A node's report, not a rollout entry (entries are keyed by the bare SHA)."""
    return "." in key


async def last_values(js: JetStreamContext, stream: str, subjects: str
                      ) -> dict[str, tuple[bytes, datetime | None]]:
    """The last value of every KV key matching `subjects` (a `$KV.<bucket>.` filter), by
    key, deletes left out: one ordered consumer whose callback collects them all, so a
    hundred values cost one turn of a busy event loop, not one turn each (a KeyWatcher
    hands them over one `wait_for` at a time)."""
    prefix = subjects[:subjects.index(".", len("$KV.")) + 1]
    found: dict[str, tuple[bytes, datetime | None]] = {}
    done = asyncio.Event()

    async def collect(msg: Msg) -> None:
        key = msg.subject[len(prefix):]
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
            found.pop(key, None)
        else:
            stamp: Any = msg.metadata.timestamp
            found[key] = (msg.data, stamp if isinstance(stamp, datetime) else None)
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(subjects, stream=stream, cb=collect, ordered_consumer=True,
                             deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
    try:
        info = await sub.consumer_info()
        if info.num_pending or (info.delivered and info.delivered.consumer_seq):
            await asyncio.wait_for(done.wait(), OP_TIMEOUT_S)
        return found
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def read_reports(js: JetStreamContext, revision: str) -> dict[str, NodeReport]:
    """Every node's latest report at `revision` (the values of `<sha>.*`)."""
    reports: dict[str, NodeReport] = {}
    prefix = f"{ROLLOUTS_SUBJECT_PREFIX}.{revision}."
    for key, (data, _) in (await last_values(js, ROLLOUTS_STREAM, f"{prefix}*")).items():
        with contextlib.suppress(ValueError):
            reports[key.rsplit(".", 1)[-1]] = NodeReport.from_json(data)  # the key vouches
    return reports


async def reported_nodes(js: JetStreamContext, revision: str) -> tuple[set[str], int]:
    """Which nodes wrote a report at `revision`, and the bucket's last sequence: one
    stream-info request (the subjects of `<sha>.*`), no values read."""
    prefix = f"{ROLLOUTS_SUBJECT_PREFIX}.{revision}."
    info = await js.stream_info(ROLLOUTS_STREAM, subjects_filter=f"{prefix}*")
    nodes = {subject[len(prefix):] for subject in (info.state.subjects or {})}
    return nodes, int(info.state.last_seq or 0)


async def read_entry(kv: KeyValue, revision: str) -> tuple[RolloutEntry | None, int]:
    """(entry or None, its KV revision: 0 when the key does not exist; a deleted or purged
    key's marker has one, which the next compare-and-set must expect)."""
    try:
        got = await kv.get(revision)
    except nats.js.errors.KeyNotFoundError as exc:
        marker = exc.entry  # nats-py hands a delete marker over with the error
        return None, int(marker.revision or 0) if marker is not None else 0
    if got.value is None or got.operation in ("DEL", "PURGE"):
        return None, int(got.revision or 0)
    try:
        return RolloutEntry.from_json(got.value), int(got.revision or 0)
    except ValueError:
        log.warning("unreadable rollout entry %s in %s: overwriting it", revision[:12],
                    ROLLOUTS_BUCKET)
        return None, int(got.revision or 0)


async def cas_update(
    js: JetStreamContext, kv: KeyValue, options: NatsOptions, revision: str,
    change: Callable[[RolloutEntry | None], Step | None], attempts: int = CAS_ATTEMPTS,
    read: tuple[RolloutEntry | None, int] | None = None,
) -> CasResult:
    """get -> change -> write expecting the read revision; again on a conflict.
    `change` returns None (or the same entry) for "nothing to write". `read`: the entry
    and its KV revision as just read (the first attempt needs no get of its own)."""
    subject = options.kv_put_subject(ROLLOUTS_BUCKET, revision)
    for attempt in range(1, attempts + 1):
        current, seq = read if read is not None and attempt == 1 else await read_entry(
            kv, revision)
        step = change(current)
        if step is None or step.entry == current:
            return CasResult(current, (), False, attempt)
        # the state in a header: watchers decide whether to act without parsing the JSON
        headers = {"Nats-Expected-Last-Subject-Sequence": str(seq),
                   STATE_HEADER: step.entry.state}
        try:
            await js.publish(subject, step.entry.to_json_bytes(), headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code not in _WRONG_LAST:
                raise
            # someone wrote first: compute again from theirs; an exponentially growing,
            # jittered pause spreads a herd (N writers cost O(N log N) attempts, not N^2)
            await asyncio.sleep(random.uniform(0, min(0.1, 0.001 * 2 ** min(attempt, 8))))
            continue
        return CasResult(step.entry, step.events, True, attempt)
    raise RolloutUnavailable(f"{ROLLOUTS_BUCKET} {revision[:12]}: no compare-and-set won "
                             f"after {attempts} attempts")


async def read_members(js: JetStreamContext, now: datetime) -> dict[str, Member]:
    """Every node's labels and liveness from gitops_nodes (heartbeat age, as observers see)."""
    try:
        values = await last_values(js, KV_STREAM, f"{KV_SUBJECT_PREFIX}.>")
    except nats.js.errors.NotFoundError:
        return {}
    members: dict[str, Member] = {}
    for key, (value, written) in values.items():
        try:  # only what membership needs (a NodeStatus per node costs too much here)
            raw = json.loads(value)
            labels = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
            revisions = tuple(str(raw[k]) for k in ("revision", "desired_revision")
                              if raw.get(k))
            interval = float(raw.get("heartbeat_interval_s") or 10.0)
            updated = raw.get("updated_at")
        except (ValueError, TypeError, AttributeError):
            continue
        online = not heartbeat_stale(updated if isinstance(updated, str) else None,
                                     interval, now, written)
        members[key] = Member(labels, online, revisions or ("",))
    return members


def rollout_event_payload(event: RolloutEvent, node: str, now: datetime
                          ) -> tuple[str, bytes]:
    """(subject, JSON) of a rollout event announced by `node` (an operator: "console")."""
    built = make_event(event.type, node, now, event_id=event.id, revision=event.revision,
                       message=event.message, data=event.data or None)
    return event_subject(node, event.type), built.to_json_bytes()


async def publish_events(js: JetStreamContext, events: tuple[RolloutEvent, ...], node: str,
                         now: datetime) -> None:
    """Publish operator-caused events straight to the stream (Nats-Msg-Id = event id)."""
    for event in events:
        subject, payload = rollout_event_payload(event, node, now)
        try:
            await js.publish(subject, payload, headers={"Nats-Msg-Id": event.id})
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("could not publish %s: %s", event.type, reason_of(exc))


async def operate_rollout(
    js: JetStreamContext, kv: KeyValue, options: NatsOptions, revision: str, action: str,
    reason: str = "", *, actor: str = "console",
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> CasResult:
    """An operator's pause / resume / abort / promote, by CAS (then an advance with the
    fleet as it is); its events are published with Nats-Msg-Id by the writer that won.
    Raises RolloutRefused (no such rollout, or the action does not apply)."""
    members = await read_members(js, now())

    def change(current: RolloutEntry | None) -> Step:
        if current is None:
            raise RolloutRefused(f"no rollout of {revision[:12]} in {ROLLOUTS_BUCKET}")
        at = now()
        step = operate(current, action, at, reason)
        after = advance(step.entry, members, at)
        return Step(after.entry, (*step.events, *after.events))

    result = await cas_update(js, kv, options, revision, change)
    await publish_events(js, result.events, actor, now())
    return result


async def resolve_revision(kv: KeyValue, wanted: str) -> str | None:
    """The full SHA key of a rollout from a full SHA or a unique prefix (>= 4 hex)."""
    wanted = wanted.strip().lower()
    if len(wanted) == 40:
        return wanted
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return None
    found = [k for k in keys
             if len(wanted) >= 4 and k.startswith(wanted) and not is_report_key(k)]
    return found[0] if len(found) == 1 else None


class MeshCoordinator:
    """RolloutCoordinator over one node's NATS connection (reconciler.mesh.link.Mesh owns it)."""

    def __init__(self, connection: Callable[[], NATS | None], options: NatsOptions, *,
                 create_bucket: bool = True,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._connection = connection
        self.options = options
        self.create_bucket = create_bucket
        self._now = now
        self._kv: KeyValue | None = None
        self._js: JetStreamContext | None = None
        self._js_of: NATS | None = None
        self._members: tuple[float, str, dict[str, Member]] | None = None
        # (revision, its History, what git said of each revision traced so far)
        self._history: tuple[str, History, dict[str, bool]] | None = None
        self._watch: tuple[str, asyncio.Task[None]] | None = None
        self.cas_attempts = 0  # writes tried in total (for tests and benchmarks)
        self._report_ttl = True  # False once the bucket refused a Nats-TTL header
        self._superseding_asked: tuple[str, str] | None = None  # (older, newer), last asked
        self._background: set[asyncio.Task[None]] = set()

    async def _open(self, create: bool = True) -> tuple[JetStreamContext, KeyValue]:
        nc = self._connection()
        if nc is None or not nc.is_connected:
            raise RolloutUnavailable("NATS is not connected")
        if self._js is None or self._js_of is not nc:
            self._js, self._js_of, self._kv = self.options.jetstream(nc), nc, None
        if self._kv is None:
            self._kv = await rollouts_bucket(self._js, create=self.create_bucket and create)
            if self._kv is None:
                raise RolloutUnavailable(f"the {ROLLOUTS_BUCKET} bucket does not exist "
                                         "(run gitops-mesh nats-init)")
        return self._js, self._kv

    async def _fleet(self, js: JetStreamContext, node: str, labels: Mapping[str, str],
                     revision: str) -> dict[str, Member]:
        """The fleet, read at most once per FLEET_CACHE_S per revision (a read made for
        another revision is stale for this one: nodes moved since); this node is always
        placed and online."""
        cached = self._members
        if (cached is None or cached[1] != revision
                or time.monotonic() - cached[0] > FLEET_CACHE_S):
            members = await self._traced(revision, await read_members(js, self._now()))
            cached = (time.monotonic(), revision, members)
            self._members = cached
        return {**cached[2], node: Member(dict(labels), True)}

    async def _traced(self, revision: str, members: dict[str, Member]) -> dict[str, Member]:
        """`members`, those at an earlier commit of `revision` marked so (a node still at a
        superseded revision belongs to the rollout as much as one at its base). Git is
        asked once per revision seen, in a thread."""
        traced = self._history
        if traced is None or traced[0] != revision:
            return members
        _, ask, known = traced
        todo = revisions_to_trace(members, revision, known)
        if todo:
            try:
                earlier = await asyncio.to_thread(ask, todo)
            except Exception as exc:  # git trouble: judge by the statuses alone this time
                log.warning("rollout %s: could not trace revisions in git: %s",
                            revision[:12], exc)
                return members
            known.update((r, r in earlier) for r in todo)
        return with_history(members, [r for r, earlier in known.items() if earlier])

    async def _guarded(self, work: Any) -> Any:
        try:
            return await asyncio.wait_for(work, 3 * OP_TIMEOUT_S)
        except RolloutUnavailable:
            self._kv = None
            raise
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            self._kv = None
            raise RolloutUnavailable(f"{ROLLOUTS_BUCKET}: {reason_of(exc)}") from exc

    async def consult(self, revision: str, spec: RolloutSpec, node: str,
                      labels: Mapping[str, str], previous: str | None,
                      later: Callable[[tuple[RolloutEvent, ...]], None] | None = None,
                      history: History | None = None
                      ) -> tuple[Verdict, tuple[RolloutEvent, ...]]:
        if history is not None and (self._history is None or self._history[0] != revision):
            self._history = (revision, history, {})
        result: tuple[Verdict, tuple[RolloutEvent, ...]] = await self._guarded(
            self._consult(revision, spec, node, labels, previous, later))
        return result

    async def _consult(self, revision: str, spec: RolloutSpec, node: str,
                       labels: Mapping[str, str], previous: str | None,
                       later: Callable[[tuple[RolloutEvent, ...]], None] | None
                       ) -> tuple[Verdict, tuple[RolloutEvent, ...]]:
        js, kv = await self._open()
        events: list[RolloutEvent] = []
        read = await read_entry(kv, revision)
        existing = read[0]
        base = existing.base if existing is not None else None
        if existing is None:
            base, superseded = await self._supersede(js, kv, previous, revision)
            events += superseded
        elif previous not in (None, revision, existing.base) and \
                (previous, revision) != self._superseding_asked:
            # this node ran a revision the entry's creator did not (a rollout it baked, say):
            # that rollout ends as superseded too, off this node's way to applying (once)
            self._superseding_asked = (previous, revision)
            self._start(f"rollout-supersede-{previous[:8]}",
                        self._superseding(js, kv, previous, revision), later)
        # The fleet (membership, offline nodes) is read only where it matters. Every node
        # hears of a push at once; the first to create the entry creates it unplaced (no
        # wave opens yet), then reads the fleet and places every wave's nodes. The others,
        # and later every node whose wave is open, place themselves and go on without a
        # fleet read; a node that must wait reads it (its consults advance the rollout).
        me = {node: Member(dict(labels), True)}
        verdict, result, created = await self._consult_with(
            js, kv, revision, spec, node, me, base, fleet=False,
            read=read if existing is not None else None)
        events += result.events
        self.cas_attempts += result.attempts
        if created:
            # placing every wave's nodes needs a fleet read and a few round trips: not on
            # this node's way to applying (nothing can complete before the reports anyway)
            self._start_placing(revision, node, labels, later)
        if verdict.kind in ("apply", "aborted", "superseded"):
            return verdict, tuple(events)
        members = await self._fleet(js, node, labels, revision)
        verdict, result, _ = await self._consult_with(
            js, kv, revision, spec, node, members, base, fleet=True)
        self.cas_attempts += result.attempts
        return verdict, (*events, *result.events)

    def _start_placing(self, revision: str, node: str, labels: Mapping[str, str],
                       later: Callable[[tuple[RolloutEvent, ...]], None] | None) -> None:
        async def placing() -> tuple[RolloutEvent, ...]:
            js, kv = await self._open()
            return (await self._place(js, kv, revision, node, labels))[1]

        # should it fail, a reporter places the waves later (PLACE_AFTER_S)
        self._start(f"rollout-place-{revision[:8]}", placing(), later)

    def _start(self, name: str, work: Any,
               later: Callable[[tuple[RolloutEvent, ...]], None] | None) -> None:
        """Run `work` (-> events) in the background; its events go to `later`."""
        async def run() -> None:
            try:
                events = await self._guarded(work)
            except RolloutUnavailable as exc:
                log.warning("%s: %s", name, exc)
                return
            if events and later is not None:
                try:
                    later(events)
                except Exception:  # the agent is closing: its outbox is gone
                    log.exception("%s: could not record %s", name,
                                  ", ".join(e.type for e in events))

        task = asyncio.get_running_loop().create_task(run(), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _place(self, js: JetStreamContext, kv: KeyValue, revision: str, node: str,
                     labels: Mapping[str, str]
                     ) -> tuple[RolloutEntry | None, tuple[RolloutEvent, ...]]:
        """Place every wave's nodes from a fleet read, with the reports written so far. A
        node reporting into the unplaced entry leaves its report to this: so once placed,
        the reports written before the placement are folded in too (a second fold only if
        some came in meanwhile); a report written after it meets a placed entry."""
        members = await self._fleet(js, node, labels, revision)
        events: list[RolloutEvent] = []
        entry: RolloutEntry | None = None
        for _ in range(2):
            reports = await read_reports(js, revision)

            def change(current: RolloutEntry | None,
                       reports: dict[str, NodeReport] = reports) -> Step | None:
                return None if current is None else fold(
                    current, reports, members, self._now(), fleet=True)

            result = await cas_update(js, kv, self.options, revision, change)
            events += result.events
            self.cas_attempts += result.attempts
            entry = result.entry
            if entry is None or (await reported_nodes(js, revision))[0] <= set(reports):
                break
        return entry, tuple(events)

    async def _consult_with(self, js: JetStreamContext, kv: KeyValue, revision: str,
                            spec: RolloutSpec, node: str, members: Mapping[str, Member],
                            base: str | None, fleet: bool,
                            read: tuple[RolloutEntry | None, int] | None = None
                            ) -> tuple[Verdict, CasResult, bool]:
        """One consult by CAS; (verdict, result, whether this write created the entry)."""
        verdict = Verdict("wait", "rollout state not read yet")
        created = False

        def change(current: RolloutEntry | None) -> Step:
            nonlocal verdict, created
            now = self._now()
            created = current is None
            entry = current if current is not None else new_entry(
                revision, spec, base, now, placed=False)
            step, verdict = consult(entry, node, members, now, fleet=fleet)
            return step

        result = await cas_update(js, kv, self.options, revision, change, read=read)
        return verdict, result, created and result.wrote

    async def _supersede(self, js: JetStreamContext, kv: KeyValue, previous: str | None,
                         revision: str) -> tuple[str | None, tuple[RolloutEvent, ...]]:
        """The base of a new rollout; an unfinished previous one is superseded by it."""
        if previous is None or previous == revision:
            return previous, ()
        before, _ = await read_entry(kv, previous)
        base = base_for(before, previous)
        if before is None:
            return base, ()
        result = await cas_update(
            js, kv, self.options, previous,
            lambda current: None if current is None else supersede(current, revision,
                                                                   self._now()))
        return base, result.events

    async def _superseding(self, js: JetStreamContext, kv: KeyValue, previous: str | None,
                           revision: str) -> tuple[RolloutEvent, ...]:
        return (await self._supersede(js, kv, previous, revision))[1]

    async def supersede(self, previous: str | None, revision: str
                        ) -> tuple[RolloutEvent, ...]:
        """A node moved from `previous` to a revision without rollout.yaml: an unfinished
        rollout of `previous` is superseded (not left progressing forever)."""
        async def work() -> tuple[RolloutEvent, ...]:
            try:
                js, kv = await self._open(create=False)  # no bucket: no rollout to end
            except RolloutUnavailable:
                return ()
            return await self._superseding(js, kv, previous, revision)
        result: tuple[RolloutEvent, ...] = await self._guarded(work())
        return result

    async def report(self, revision: str, node: str, labels: Mapping[str, str],
                     outcome: NodeOutcome, message: str,
                     later: Callable[[tuple[RolloutEvent, ...]], None] | None = None
                     ) -> tuple[RolloutEntry | None, tuple[RolloutEvent, ...]]:
        result: tuple[RolloutEntry | None, tuple[RolloutEvent, ...]] = await self._guarded(
            self._report(revision, node, labels, outcome, message, later))
        return result

    async def _report(self, revision: str, node: str, labels: Mapping[str, str],
                      outcome: NodeOutcome, message: str,
                      later: Callable[[tuple[RolloutEvent, ...]], None] | None
                      ) -> tuple[RolloutEntry | None, tuple[RolloutEvent, ...]]:
        js, kv = await self._open()
        mine = NodeReport(node=node, outcome=outcome, message=message[:300],
                          labels=dict(labels), at=iso_time(self._now()))
        # written before looking at the others' (so of several nodes reporting last at once,
        # at least one sees them all): a plain put, nobody waits for anybody
        ack = await self._put_report(js, revision, node, mine)
        # the entry and who reported, side by side (one round trip on this node's way)
        read, (reported, last_seq) = await asyncio.gather(
            read_entry(kv, revision), reported_nodes(js, revision))
        current = read[0]
        if current is None:
            return None, ()  # no rollout (deleted): nothing to fold into
        due = fold_due(current, node, outcome, self._now())
        if due == "place":
            return await self._place(js, kv, revision, node, labels)
        if due is None:
            if not wave_reported(current, reported):
                return current, ()
            if ack.seq != last_seq and node != completing_folder(current):
                # a herd that all saw the wave reported leaves it to the one that wrote last
                # (nothing written after its report) and one chosen by name; the others
                # look again shortly, in case neither of those saw the last reports
                self._start(f"rollout-fold-{revision[:8]}",
                            self._fold_late(revision, node, labels), later)
                return current, ()
            return await self._fold_all(js, kv, revision, node, labels, {node: mine})
        members = self._known(revision, node, labels)

        def own(at_entry: RolloutEntry | None) -> Step | None:
            at = self._now()
            if at_entry is None or fold_due(at_entry, node, outcome, at) is None:
                return None  # another node's fold took ours in, or is the fresher one
            return fold(at_entry, {node: mine}, members, at)

        result = await cas_update(js, kv, self.options, revision, own, read=read)
        self.cas_attempts += result.attempts
        if due == "own" or not result.wrote:
            return result.entry, result.events
        # this node's write won the progress fold: everybody's reports now
        entry, events = await self._fold_all(js, kv, revision, node, labels, {node: mine})
        return entry or result.entry, (*result.events, *events)

    async def _put_report(self, js: JetStreamContext, revision: str, node: str,
                          mine: NodeReport) -> api.PubAck:
        """The report, with its expiry when the bucket allows per-message TTLs (one made by
        an older nats-init does not: then without, and `nats-init --update` is advised)."""
        subject = self.options.kv_put_subject(ROLLOUTS_BUCKET, report_key(revision, node))
        if self._report_ttl:
            try:
                return await js.publish(subject, mine.to_json_bytes(),
                                        headers={"Nats-TTL": ROLLOUT_REPORT_TTL})
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _TTL_DISABLED:
                    raise
                self._report_ttl = False
                log.warning("%s does not allow per-message TTLs: rollout report keys will "
                            "not expire (run `gitops-mesh nats-init --update`)", ROLLOUTS_BUCKET)
        return await js.publish(subject, mine.to_json_bytes())

    def _known(self, revision: str, node: str, labels: Mapping[str, str]) -> dict[str, Member]:
        """The fleet as last read for this revision (consult read it), and this node: placing
        and offline nodes are the consults' business; a report must not cost a fleet read."""
        cached = self._members
        return {**(cached[2] if cached and cached[1] == revision else {}),
                node: Member(dict(labels), True)}

    async def _fold_all(self, js: JetStreamContext, kv: KeyValue, revision: str, node: str,
                        labels: Mapping[str, str], mine: Mapping[str, NodeReport]
                        ) -> tuple[RolloutEntry | None, tuple[RolloutEvent, ...]]:
        """Every node's report into the entry, by CAS (a fold already made writes nothing)."""
        members = self._known(revision, node, labels)
        reports = {**await read_reports(js, revision), **mine}
        result = await cas_update(
            js, kv, self.options, revision,
            lambda at_entry: None if at_entry is None else fold(
                at_entry, reports, members, self._now()))
        self.cas_attempts += result.attempts
        return result.entry, result.events

    async def _fold_late(self, revision: str, node: str, labels: Mapping[str, str]
                         ) -> tuple[RolloutEvent, ...]:
        await asyncio.sleep(random.uniform(0.5, 1.5))
        js, kv = await self._open()
        current, _ = await read_entry(kv, revision)
        if current is None or not wave_reported(current, (await reported_nodes(js, revision))[0]):
            return ()  # the chosen one folded them
        return (await self._fold_all(js, kv, revision, node, labels, {}))[1]

    # ---- watching one entry -----------------------------------------------------------
    def watch(self, revision: str | None, on_change: Callable[[str], None] | None) -> None:
        """Call `on_change(state)` for the entry's value and each change of it (the state
        comes from a header, so watching costs no JSON parse); None stops watching."""
        if self._watch is not None and (revision is None or self._watch[0] != revision):
            self._watch[1].cancel()
            self._watch = None
        if revision is None or on_change is None or self._watch is not None:
            return
        task = asyncio.get_running_loop().create_task(self._watching(revision, on_change),
                                                      name=f"rollout-watch-{revision[:8]}")
        self._watch = (revision, task)

    async def _watching(self, revision: str, on_change: Callable[[str], None]) -> None:
        """An ordered push consumer on the entry's subject; made again after NATS trouble."""
        async def on_msg(msg: Msg) -> None:
            state = (msg.headers or {}).get(STATE_HEADER, "")
            on_change(state)

        while True:
            sub = None
            try:
                js, _ = await self._open()
                sub = await js.subscribe(
                    f"{ROLLOUTS_SUBJECT_PREFIX}.{revision}", stream=ROLLOUTS_STREAM,
                    cb=on_msg, ordered_consumer=True,
                    deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT, idle_heartbeat=5.0)
                nc = self._connection()
                while nc is not None and nc.is_connected:
                    await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: try again shortly
                log.debug("rollout watch %s: %r", revision[:12], exc)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        self.watch(None, None)
        for task in list(self._background):
            task.cancel()
