"""Fleet state: statuses, events and rollout entries applied as they arrive (no I/O, no clock)."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from console.filters import EventFilter
from reconciler.core.events import Event, parse_time
from reconciler.core.rollout import RolloutEntry
from reconciler.core.spec import NAME_RE
from reconciler.core.status import NodeStatus, observed_state

EVENT_VALIDATOR = Event.__pydantic_validator__


@dataclass
class RevisionStats:
    """What the event stream tells about one revision across the fleet."""

    revision: str
    first_seen: datetime
    reconciles: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0
    last_success: datetime | None = None
    failures: int = 0
    # node -> its latest successful reconcile at this revision (it reached synced here)
    nodes_ok: dict[str, datetime] = field(default_factory=dict)
    # node -> message of its latest failed reconcile at this revision
    nodes_failed: dict[str, str] = field(default_factory=dict)
    # every node with an event at this revision (which nodes follow the same source)
    nodes_seen: set[str] = field(default_factory=set)
    # node -> its first successful reconcile at this revision: later periodic reconciles
    # at the same revision must not move the convergence time
    nodes_first_ok: dict[str, datetime] = field(default_factory=dict)


@dataclass
class ViewMemo:
    """Caches of the derived views, owned by the fleet they are derived from."""

    # node -> (status, derived state, card): a card is rebuilt only when either changes
    cards: dict[str, tuple[NodeStatus, str, dict[str, Any]]] = field(default_factory=dict)
    # (lineage version, revision -> its lineage head): see rollout_views.lineage_head
    heads: tuple[int, dict[str, str | None]] = (-1, {})


class Fleet:
    """Everything the console knows, updated by apply_status/apply_event/apply_rollout; the
    views (console.views, console.rollout_views) read it with an injected `now`.

    Memory is bounded: one status per node, the last `events_keep` events, `revisions_keep`
    revisions of rollout statistics.

    `version` increases on every change, so pushers can tell whether anything moved;
    `lineage_version` only when a revision's first sighting or its set of nodes changes
    (what decides which revision supersedes which), so the lineage is not re-derived on
    every event.
    """

    def __init__(self, events_keep: int = 5000, revisions_keep: int = 100) -> None:
        if events_keep < 1:
            raise ValueError("events_keep must be at least 1")
        self.nodes: dict[str, NodeStatus] = {}
        # node -> its updated_at as epoch seconds (None: unparseable), parsed once per write
        self._beats: dict[str, float | None] = {}
        # (event time as epoch seconds, arrival number, event), in arrival order
        self.events: deque[tuple[float, int, Event]] = deque(maxlen=events_keep)
        self.revisions: OrderedDict[str, RevisionStats] = OrderedDict()
        self.revisions_keep = revisions_keep
        # node -> revision of its latest source.fetched event (rollout targeting)
        self.fetched: dict[str, str] = {}
        # revision -> its coordinated rollout (gitops_rollouts), when rollout.yaml governs it
        self.coordinated: dict[str, RolloutEntry] = {}
        self.memo = ViewMemo()
        self.version = 0
        self.lineage_version = 0
        self.events_total = 0
        self.rejected = 0
        self.forged = 0  # events whose body names another node/type than their subject
        self.last_error: str | None = None

    def apply_status(self, key: str, value: bytes | str | None) -> str | None:
        """A KV entry for node `key`; None/empty value = the key was deleted or purged.

        Returns an error message (and changes nothing) when the value is not a NodeStatus.
        """
        if not value:
            if self.nodes.pop(key, None) is not None:
                self.version += 1
            self._beats.pop(key, None)
            self.memo.cards.pop(key, None)
            self.fetched.pop(key, None)
            return None
        try:
            status = NodeStatus.from_json(value)
        except ValidationError as exc:
            return self._reject(f"KV key {key!r}: not a node status: {_first_error(exc)}")
        if status.node != key:
            return self._reject(f"KV key {key!r}: status is for node {status.node!r}")
        self.nodes[key] = status
        updated = parse_time(status.updated_at)
        self._beats[key] = updated.timestamp() if updated else None
        self.version += 1
        return None

    def apply_rollout(self, key: str, value: bytes | str | None) -> str | None:
        """A gitops_rollouts entry for revision `key` (None/empty: deleted or purged).

        Keys `<sha>.<node>` in that bucket are one node's report on a rollout, not an
        entry: they are skipped."""
        if "." in key:
            return None
        if not value:
            if self.coordinated.pop(key, None) is not None:
                self.version += 1
            return None
        try:
            entry = RolloutEntry.from_json(value)
        except ValidationError as exc:
            return self._reject(f"rollout {key[:12]!r}: not a rollout entry: {_first_error(exc)}")
        if entry.revision != key:
            return self._reject(f"rollout key {key[:12]!r}: entry is for {entry.revision[:12]!r}")
        self.coordinated[key] = entry
        self.version += 1
        return None

    def clear_nodes(self) -> None:
        """Forget every status (the bucket was made anew; its watch re-delivers the rest)."""
        if self.nodes:
            self.nodes.clear()
            self._beats.clear()
            self.memo.cards.clear()
            self.version += 1

    def apply_event(self, subject: str, data: bytes | str | Event) -> str | None:
        """One event from the stream, as published on `subject`; returns an error message
        (and changes nothing) if it is not an Event or not the event of that subject.

        NATS permissions let node n1 publish only on gitops.events.n1.>, but the body can
        claim any node: only the subject is vouched for by the server. An event whose
        body does not match its subject exactly is a forgery (or a bug) and is rejected.
        """
        if isinstance(data, Event):
            event = data
        else:
            try:
                # the model's own validator (same config, same result): model_validate_json
                # adds 0.4 us or more per event in passing its keyword arguments on
                event = EVENT_VALIDATOR.validate_json(data)
            except ValidationError as exc:
                return self._reject(f"event on {subject}: {_first_error(exc)}")
        if not NAME_RE.fullmatch(event.node):
            # a dotted "node" would pass the subject check below under a node's own
            # permissions (n1 may publish gitops.events.n1.x.app.deployed as node "n1.x")
            self.forged += 1
            return self._reject(f"event {event.id} on {subject}: node {event.node!r} is not "
                                "a valid node id: ignored")
        if event.subject != subject:
            self.forged += 1
            return self._reject(
                f"event {event.id} on {subject} claims to be {event.type!r} of node "
                f"{event.node!r} (expected subject {event.subject}): ignored")
        when = parse_time(event.time)
        self.events_total += 1
        self.events.append((when.timestamp() if when else 0.0, self.events_total, event))
        self.version += 1
        if event.revision and when is not None:
            self._count_revision(event, event.revision, when)
        return None

    def _reject(self, message: str) -> str:
        self.rejected += 1
        self.last_error = message
        return message

    def _count_revision(self, event: Event, rev: str, when: datetime) -> None:
        stats = self.revisions.get(rev)
        if stats is None:
            stats = self.revisions[rev] = RevisionStats(rev, when)
            self.lineage_version += 1
            while len(self.revisions) > self.revisions_keep:
                self.revisions.popitem(last=False)
        elif when < stats.first_seen:
            stats.first_seen = when
            self.lineage_version += 1
        if event.node not in stats.nodes_seen:
            stats.nodes_seen.add(event.node)
            self.lineage_version += 1
        if event.type == "source.fetched":
            self.fetched[event.node] = rev
        elif event.type == "reconcile.finished":
            stats.reconciles += 1
            if event.duration_ms is not None:
                stats.total_ms += event.duration_ms
                stats.max_ms = max(stats.max_ms, event.duration_ms)
            if event.outcome == "success":
                seen = stats.nodes_ok.get(event.node)
                if seen is None or when > seen:
                    stats.nodes_ok[event.node] = when
                first = stats.nodes_first_ok.get(event.node)
                if first is None or when < first:
                    stats.nodes_first_ok[event.node] = when
                if stats.last_success is None or when > stats.last_success:
                    stats.last_success = when
            elif event.outcome == "failure":
                stats.failures += 1
                stats.nodes_failed[event.node] = event.message or "reconcile failed"

    def node_state(self, status: NodeStatus, now: datetime) -> str:
        """The reported status, or `unreachable` when the heartbeat is too old (the rule of
        core.status, with the server's write time of the stored status when known)."""
        beat = self._beats.get(status.node) if self.nodes.get(status.node) is status else None
        written = datetime.fromtimestamp(beat, UTC) if beat is not None else None
        return observed_state(status, now, written)

    def event_log(self, where: EventFilter | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Newest first (by event time, then arrival), at most `limit` events matching `where`.

        Arrival order alone would interleave nodes whose outboxes drain late (after an
        outage) with fresh events; the log should read like a timeline.
        """
        rows = [row for row in self.events if where is None or where.matches(row[2])]
        rows.sort(key=lambda row: (row[0], row[1]), reverse=True)
        return [e.model_dump(mode="json", exclude_none=True) for _, _, e in rows[:limit]]


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "value"
    return f"{where}: {err.get('msg', 'invalid')}"
