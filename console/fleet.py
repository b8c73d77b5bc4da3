"""Fleet state: pure aggregation of node statuses (KV) and events (stream) into console views.

No I/O and no clock reads: callers pass status/event bytes in and `now` to every derived view.
Memory is bounded: one status per node, the last `events_keep` events, `revisions_keep`
revisions of rollout statistics.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from reconciler.core.events import Event, iso_time, parse_time
from reconciler.core.graph import DependencyGraph
from reconciler.core.rollout import (
    ACTIVE_STATES,
    OPERATOR_ACTIONS,
    RolloutEntry,
    bake_left,
    wave_rows,
)
from reconciler.core.spec import NAME_RE
from reconciler.core.states import NODE_STATES, STUCK_PHASES
from reconciler.core.status import UNREACHABLE, AppStatus, NodeStatus, observed_state
from reconciler.core.targeting import parse_labels

STATUSES: tuple[str, ...] = (*NODE_STATES, UNREACHABLE)
# How many missed heartbeats make a node unreachable (the contract says 3).
ROLLOUT_BUCKETS: tuple[str, ...] = (
    "synced", "progressing", "degraded", "failed", "pending", "suspended", UNREACHABLE,
)


@dataclass(frozen=True)
class EventFilter:
    """Event log filter; `type` is exact, or a prefix when it ends with `.` or `*`."""

    node: str | None = None
    app: str | None = None
    type: str | None = None

    def matches(self, event: Event) -> bool:
        if self.node and event.node != self.node:
            return False
        if self.app and event.app != self.app:
            return False
        if self.type:
            if self.type.endswith(("*", ".")):
                return event.type.startswith(self.type.rstrip("*"))
            return event.type == self.type
        return True


@dataclass(frozen=True)
class NodeFilter:
    """Overview filter: every given clause must hold. `labels` are k=v pairs."""

    labels: tuple[tuple[str, str], ...] = ()
    layer: str | None = None
    status: str | None = None

    @classmethod
    def parse(cls, labels: Iterable[str] = (), layer: str | None = None,
              status: str | None = None) -> NodeFilter:
        """From query strings like `role=edge`; raises ValueError naming a bad clause."""
        pairs = tuple(parse_labels(labels, what="label filter").items())
        if status and status not in STATUSES:
            raise ValueError(f"status filter {status!r}: expected one of {', '.join(STATUSES)}")
        return cls(pairs, layer or None, status or None)

    def matches(self, card: dict[str, Any]) -> bool:
        if any(card["labels"].get(k) != v for k, v in self.labels):
            return False
        if self.layer and self.layer not in card["layers"]:
            return False
        return not (self.status and card["status"] != self.status)


@dataclass(frozen=True)
class AppFilter:
    """Apps page filter: `name` is a substring; `label` k=v matches the app's own labels or
    the labels of the node running it; `layer` is exact."""

    name: str | None = None
    layer: str | None = None
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, name: str | None = None, layer: str | None = None,
              labels: Iterable[str] = ()) -> AppFilter:
        pairs = tuple(parse_labels(labels, what="label filter").items())
        return cls((name or "").strip() or None, layer or None, pairs)

    def matches(self, app: AppStatus, node_labels: dict[str, str]) -> bool:
        if self.name and self.name.lower() not in app.name.lower():
            return False
        if self.layer and app.layer != self.layer:
            return False
        return all(app.labels.get(k) == v or node_labels.get(k) == v for k, v in self.labels)


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


class Fleet:
    """Everything the console knows, updated by apply_status/apply_event.

    `version` increases on every change, so pushers can tell whether anything moved.
    """

    def __init__(self, events_keep: int = 5000, revisions_keep: int = 100) -> None:
        if events_keep < 1:
            raise ValueError("events_keep must be at least 1")
        self.nodes: dict[str, NodeStatus] = {}
        # node -> its updated_at as epoch seconds (None: unparseable), parsed once per write
        self._beats: dict[str, float | None] = {}
        # node -> (status, derived state, card): cards are rebuilt only when either changes
        self._cards: dict[str, tuple[NodeStatus, str, dict[str, Any]]] = {}
        # (event time as epoch seconds, arrival number, event), in arrival order
        self.events: deque[tuple[float, int, Event]] = deque(maxlen=events_keep)
        self.revisions: OrderedDict[str, RevisionStats] = OrderedDict()
        self.revisions_keep = revisions_keep
        # node -> revision of its latest source.fetched event (rollout targeting)
        self.fetched: dict[str, str] = {}
        # (fleet version, revision -> its lineage head): see lineage_head
        self._heads: tuple[int, dict[str, str | None]] = (-1, {})
        # revision -> its coordinated rollout (gitops_rollouts), when rollout.yaml governs it
        self.coordinated: dict[str, RolloutEntry] = {}
        self.version = 0
        self.events_total = 0
        self.rejected = 0
        self.forged = 0  # events whose body names another node/type than their subject
        self.last_error: str | None = None

    # ---- ingestion -------------------------------------------------------------------

    def apply_status(self, key: str, value: bytes | str | None) -> str | None:
        """A KV entry for node `key`; None/empty value = the key was deleted or purged.

        Returns an error message (and changes nothing) when the value is not a NodeStatus.
        """
        if not value:
            if self.nodes.pop(key, None) is not None:
                self.version += 1
            self._beats.pop(key, None)
            self._cards.pop(key, None)
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
        """A gitops_rollouts entry for revision `key` (None/empty: deleted or purged)."""
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

    def coordination(self, revision: str, now: datetime) -> dict[str, Any] | None:
        """The coordinated rollout of `revision` as the console shows it: state, reason,
        waves with progress and the bake countdown, and which operator actions apply."""
        entry = self.coordinated.get(revision)
        if entry is None:
            return None
        actions = []
        if entry.state == "progressing":
            actions = ["pause", "abort"]
        elif entry.state == "paused":
            actions = ["resume", "abort"]
        if entry.state in ACTIVE_STATES and entry.wave_index < len(entry.waves) - 1:
            actions.insert(1, "promote")
        return {
            "revision": entry.revision, "state": entry.state, "wave": entry.wave,
            "reason": entry.reason, "base": entry.base, "superseded_by": entry.superseded_by,
            "bake_s": entry.bake_s, "bake_left_s": bake_left(entry, now),
            "updated_at": entry.updated_at, "created_at": entry.created_at,
            "failures": dict(sorted(entry.failures.items())),
            "applying": sorted(entry.applying),
            "waves": wave_rows(entry, now),
            "actions": [a for a in OPERATOR_ACTIONS if a in actions],
        }

    def active_rollouts(self, now: datetime, limit: int = 5) -> list[dict[str, Any]]:
        """Coordinated rollouts in progress (or paused), newest first, with their waves."""
        active = sorted((e for e in self.coordinated.values() if e.state in ACTIVE_STATES),
                        key=lambda e: e.created_at, reverse=True)[:limit]
        return [view for e in active if (view := self.coordination(e.revision, now))]

    def clear_nodes(self) -> None:
        """Forget every status (the bucket was made anew; its watch re-delivers the rest)."""
        if self.nodes:
            self.nodes.clear()
            self._beats.clear()
            self._cards.clear()
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
                event = Event.model_validate_json(data)
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
        if event.revision:
            self._count_revision(event)
        return None

    def _reject(self, message: str) -> str:
        self.rejected += 1
        self.last_error = message
        return message

    def _count_revision(self, event: Event) -> None:
        rev = event.revision
        assert rev is not None
        when = parse_time(event.time)
        if when is None:
            return
        stats = self.revisions.get(rev)
        if stats is None:
            stats = self.revisions[rev] = RevisionStats(rev, when)
            while len(self.revisions) > self.revisions_keep:
                self.revisions.popitem(last=False)
        elif when < stats.first_seen:
            stats.first_seen = when
        stats.nodes_seen.add(event.node)
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

    # ---- derived values --------------------------------------------------------------

    def node_state(self, status: NodeStatus, now: datetime) -> str:
        """The reported status, or `unreachable` when the heartbeat is too old (the rule of
        core.status, with the server's write time of the stored status when known)."""
        beat = self._beats.get(status.node) if self.nodes.get(status.node) is status else None
        written = datetime.fromtimestamp(beat, UTC) if beat is not None else None
        return observed_state(status, now, written)

    def card(self, status: NodeStatus, now: datetime) -> dict[str, Any]:
        """One node's overview card (built once per status and derived state; treat it as
        read-only: the same dict is handed out again while nothing changed)."""
        state = self.node_state(status, now)
        cached = self._cards.get(status.node)
        if cached is not None and cached[0] is status and cached[1] == state:
            return cached[2]
        card = self._build_card(status, state)
        if self.nodes.get(status.node) is status:
            self._cards[status.node] = (status, state, card)
        return card

    def _build_card(self, status: NodeStatus, state: str) -> dict[str, Any]:
        apps = status.apps
        return {
            "node": status.node,
            "status": state,
            "reported_status": status.status,
            "message": status.message,
            "revision": status.revision,
            "desired_revision": status.desired_revision,
            "labels": dict(status.labels),
            "layers": sorted({a.layer for a in apps if a.layer}),
            "apps": {
                "total": len(apps),
                "running": sum(a.phase == "running" for a in apps),
                # a rolled-back app that runs is not failed: it is counted apart
                "failed": sum(a.phase in STUCK_PHASES for a in apps),
                "rolled_back": sum(_rolled_back(a) for a in apps),
                "unhealthy": sum(a.health == "unhealthy" for a in apps),
            },
            "updated_at": status.updated_at,
            "last_reconcile_at": status.last_reconcile_at,
            "last_reconcile_ms": status.last_reconcile_ms,
            "agent_version": status.agent_version,
        }

    def cards(self, now: datetime, where: NodeFilter | None = None) -> list[dict[str, Any]]:
        cards = [self.card(self.nodes[n], now) for n in sorted(self.nodes)]
        return [c for c in cards if where is None or where.matches(c)]

    def counters(self, now: datetime) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        apps_running = apps_failed = apps_total = apps_rolled_back = 0
        for status in self.nodes.values():
            card = self.card(status, now)
            counts[card["status"]] = counts.get(card["status"], 0) + 1
            apps_total += card["apps"]["total"]
            apps_running += card["apps"]["running"]
            apps_failed += card["apps"]["failed"]
            apps_rolled_back += card["apps"]["rolled_back"]
        return {
            "nodes": len(self.nodes), **counts,
            "apps": apps_total, "apps_running": apps_running, "apps_failed": apps_failed,
            "apps_rolled_back": apps_rolled_back,
        }

    def filter_choices(self) -> dict[str, Any]:
        """Label keys/values and layers present in the fleet, for the overview's filters."""
        labels: dict[str, set[str]] = {}
        layers: set[str] = set()
        for status in self.nodes.values():
            for key, value in status.labels.items():
                labels.setdefault(key, set()).add(value)
            layers.update(a.layer for a in status.apps if a.layer)
        return {
            "labels": {k: sorted(v) for k, v in sorted(labels.items())},
            "layers": sorted(layers),
            "statuses": list(STATUSES),
        }

    def overview(self, now: datetime, where: NodeFilter | None = None) -> dict[str, Any]:
        return {
            "now": iso_time(now),
            "counters": self.counters(now),
            "nodes": self.cards(now, where),
            "filters": self.filter_choices(),
            "rollouts": self.recent_rollouts(now),
            "active_rollouts": self.active_rollouts(now),
        }

    def node_view(self, node: str, now: datetime, events: int = 50) -> dict[str, Any] | None:
        status = self.nodes.get(node)
        if status is None:
            return None
        return {
            "now": iso_time(now),
            "card": self.card(status, now),
            "status": status.model_dump(mode="json"),
            "events": self.event_log(EventFilter(node=node), events),
            "graph": dependency_layout(status.apps),
        }

    def app_view(self, name: str, now: datetime, events: int = 50) -> dict[str, Any] | None:
        rows = []
        versions: dict[str, int] = {}
        phases: dict[str, int] = {}
        for node in sorted(self.nodes):
            status = self.nodes[node]
            for app in status.apps:
                if app.name != name:
                    continue
                rows.append({
                    "node": node,
                    "node_status": self.node_state(status, now),
                    **app.model_dump(mode="json", exclude={"name", "depends_on", "labels"}),
                })
                versions[app.version] = versions.get(app.version, 0) + 1
                phases[app.phase] = phases.get(app.phase, 0) + 1
        log = self.event_log(EventFilter(app=name), events)
        if not rows and not log:
            return None
        return {
            "now": iso_time(now), "app": name, "nodes": rows,
            "versions": dict(sorted(versions.items())), "phases": dict(sorted(phases.items())),
            "events": log,
        }

    def apps_index(self, where: AppFilter | None = None) -> list[dict[str, Any]]:
        """Every app across the fleet: nodes running it, versions in use with node counts,
        nodes per phase and per health; `where` filters by name, layer and label."""
        index: dict[str, dict[str, Any]] = {}
        for node in sorted(self.nodes):
            status = self.nodes[node]
            for app in status.apps:
                if where is not None and not where.matches(app, status.labels):
                    continue
                row = index.setdefault(app.name, {
                    "app": app.name, "nodes": 0, "running": 0, "failed": 0, "rolled_back": 0,
                    "unhealthy": 0, "versions": {}, "phases": {}, "health": {},
                    "layer": app.layer, "labels": dict(app.labels), "depends_on": [],
                })
                row["nodes"] += 1
                row["running"] += app.phase == "running"
                row["failed"] += app.phase in STUCK_PHASES
                row["rolled_back"] += _rolled_back(app)
                row["unhealthy"] += app.health == "unhealthy"
                for key, value in (("versions", app.version), ("phases", app.phase),
                                   ("health", app.health)):
                    row[key][value] = row[key].get(value, 0) + 1
                row["depends_on"] = sorted({*row["depends_on"], *app.depends_on})
        return [{**row, "versions": sorted(row["versions"]),
                 "version_counts": dict(sorted(row["versions"].items())),
                 "phases": dict(sorted(row["phases"].items())),
                 "health": dict(sorted(row["health"].items()))}
                for _, row in sorted(index.items())]

    def apps_view(self, now: datetime, where: AppFilter | None = None) -> dict[str, Any]:
        """The Apps page: every app (filtered) and the choices for its filters."""
        choices = self.filter_choices()
        return {"now": iso_time(now), "apps": self.apps_index(where),
                "filters": {"layers": choices["layers"], "labels": choices["labels"]},
                "nodes": len(self.nodes)}

    def dependency_view(self, node: str) -> dict[str, Any] | None:
        """The node's apps laid out for drawing: see dependency_layout."""
        status = self.nodes.get(node)
        return None if status is None else dependency_layout(status.apps)

    def resolve_revision(self, prefix: str) -> str | None:
        """A full revision from a unique prefix (short SHA), or None."""
        known = set(self.revisions) | set(self.coordinated)
        for status in self.nodes.values():
            known.update(r for r in (status.revision, status.desired_revision) if r)
        if prefix in known:
            return prefix
        matches = {r for r in known if r.startswith(prefix)} if len(prefix) >= 4 else set()
        return matches.pop() if len(matches) == 1 else None

    def rollout_bucket(self, status: NodeStatus, revision: str, now: datetime) -> str | None:
        """Where a node stands in the rollout of `revision`, or None if it is not targeted.

        A node targets its desired revision (or, without one, the revision it runs); a node
        whose latest fetch saw `revision` but whose status does not show it yet is pending.
        A node that moved on to another revision is no longer part of this rollout.
        """
        reported = status.revision == revision
        target = status.desired_revision or status.revision
        if target != revision:
            heading = (self.fetched.get(status.node) == revision
                       or (target is not None and self.lineage_head(target) == revision))
            if heading and not reported:
                state = self.node_state(status, now)
                return state if state in (UNREACHABLE, "suspended") else "pending"
            return None
        state = self.node_state(status, now)
        if state in (UNREACHABLE, "suspended", "failed"):
            return state
        if reported:
            return state if state in ("synced", "degraded") else "progressing"
        return "progressing"

    def rollout_view(self, revision: str, now: datetime) -> dict[str, Any] | None:
        """Where the rollout of `revision` stands, node by node.

        Nodes at (or heading for) the revision are placed by their live status. Nodes that
        have moved on (the revision was superseded) are placed by how it went for them
        here, from the events in memory: synced if a reconcile at it succeeded, failed if
        it only failed; they are listed in `from_events`.
        """
        full = self.resolve_revision(revision)
        if full is None:
            return None
        stats = self.revisions.get(full)
        buckets: dict[str, list[str]] = {b: [] for b in ROLLOUT_BUCKETS}
        failing = []
        from_events = []
        names = set(self.nodes)
        if stats is not None:
            names.update(stats.nodes_ok, stats.nodes_failed)
        for node in sorted(names):
            status = self.nodes.get(node)
            bucket = self.rollout_bucket(status, full, now) if status is not None else None
            if bucket is not None:
                buckets[bucket].append(node)
                if bucket in ("failed", "degraded"):
                    assert status is not None
                    failing.append({"node": node, "status": bucket,
                                    "error": _node_error(status)})
                continue
            if stats is None:
                continue
            if node in stats.nodes_ok:
                buckets["synced"].append(node)
            elif node in stats.nodes_failed:
                buckets["failed"].append(node)
                failing.append({"node": node, "status": "failed",
                                "error": stats.nodes_failed[node]})
            else:
                continue
            from_events.append(node)
        targeted = sum(len(v) for v in buckets.values())
        # the last success of a node counted as synced: none while no node is synced
        synced_at = [stats.nodes_ok[n] for n in buckets["synced"]
                     if stats is not None and n in stats.nodes_ok]
        return {
            "now": iso_time(now),
            "revision": full,
            "targeted": targeted,
            "counts": {b: len(v) for b, v in buckets.items()},
            "nodes": buckets,
            "failing": failing,
            "progress": round(len(buckets["synced"]) / targeted, 4) if targeted else 0.0,
            "first_seen": iso_time(stats.first_seen) if stats else None,
            "last_success": iso_time(max(synced_at)) if synced_at else None,
            "superseded_by": self.superseded_by(full),
            "from_events": from_events,
            "coordination": self.coordination(full, now),
        }

    def lineage_head(self, revision: str) -> str | None:
        """The newest revision that (transitively) supersedes `revision`, or None when none
        does: a node still at `revision` follows the same source and will be heading there
        (a new rollout counts the nodes that have not fetched it yet as pending)."""
        if self._heads[0] != self.version:
            self._heads = (self.version, {})
        heads = self._heads[1]
        if revision not in heads:
            head, seen = None, {revision}
            nxt = self.superseded_by(revision)
            while nxt is not None and nxt not in seen:
                head = nxt
                seen.add(nxt)
                nxt = self.superseded_by(nxt)
            heads[revision] = head
        return heads[revision]

    def superseded_by(self, revision: str) -> str | None:
        """The next revision (by first sighting) seen by nodes that saw `revision`, or None
        while there is none. Nodes may follow other branches or repos: a revision of
        those does not supersede this one."""
        stats = self.revisions.get(revision)
        if stats is None:
            return None
        newer = [s for s in self.revisions.values() if s.first_seen > stats.first_seen
                 and not s.nodes_seen.isdisjoint(stats.nodes_seen)]
        return min(newer, key=lambda s: s.first_seen).revision if newer else None

    def recent_rollouts(self, now: datetime, limit: int = 5) -> list[dict[str, Any]]:
        """The newest revisions (by first sighting) with their synced/targeted counts."""
        revs = sorted(self.revisions.values(), key=lambda s: s.first_seen, reverse=True)
        seen = {s.revision for s in revs}
        # Revisions only known from KV (events not replayed) still deserve a line.
        extra = sorted({s.revision for s in self.nodes.values() if s.revision} - seen)
        out = []
        for rev in [s.revision for s in revs] + extra:
            view = self.rollout_view(rev, now)
            if view is None or not view["targeted"]:
                continue
            out.append({
                "revision": rev, "targeted": view["targeted"], "synced": view["counts"]["synced"],
                # degraded apart from failed: the overview's counters count them apart too
                "failed": view["counts"]["failed"], "degraded": view["counts"]["degraded"],
                "pending": view["counts"]["pending"],
                "progress": view["progress"], "first_seen": view["first_seen"],
            })
            if len(out) >= limit:
                break
        return out

    def event_log(self, where: EventFilter | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Newest first (by event time, then arrival), at most `limit` events matching `where`.

        Arrival order alone would interleave nodes whose outboxes drain late (after an
        outage) with fresh events; the log should read like a timeline.
        """
        rows = [row for row in self.events if where is None or where.matches(row[2])]
        rows.sort(key=lambda row: (row[0], row[1]), reverse=True)
        return [e.model_dump(mode="json", exclude_none=True) for _, _, e in rows[:limit]]

    def series(self, now: datetime, window_s: float = 6 * 3600) -> list[dict[str, Any]]:
        """Per revision seen in the window, oldest first: reconcile durations and convergence.

        Convergence = the time from the revision's first sighting (a fetch or reconcile start
        anywhere in the fleet) until the last node that saw it first reconciled it
        successfully; None (`converged` false) while some node that saw it never has. Later
        periodic reconciles at the same revision do not move it.
        """
        out = []
        for stats in sorted(self.revisions.values(), key=lambda s: s.first_seen):
            if (now - stats.first_seen).total_seconds() > window_s:
                continue
            converged = bool(stats.nodes_seen) and stats.nodes_seen <= stats.nodes_first_ok.keys()
            convergence = (
                round((max(stats.nodes_first_ok.values()) - stats.first_seen).total_seconds(), 3)
                if converged else None
            )
            out.append({
                "revision": stats.revision,
                "first_seen": iso_time(stats.first_seen),
                "reconciles": stats.reconciles,
                "failures": stats.failures,
                "mean_ms": round(stats.total_ms / n, 1) if (n := stats.reconciles) else None,
                "max_ms": round(stats.max_ms, 1) if n else None,
                "nodes_synced": len(stats.nodes_ok),
                "nodes_seen": len(stats.nodes_seen),
                "converged": converged,
                "convergence_s": convergence,
            })
        return out


def _rolled_back(app: AppStatus) -> bool:
    """An upgrade to `failed_version` was rolled back and the app runs its previous one."""
    return bool(app.failed_version) and app.phase not in STUCK_PHASES


def _node_error(status: NodeStatus) -> str:
    """The most specific reason a node gives for failing."""
    parts = [status.message] if status.message else []
    for app in status.apps:
        if (app.phase in STUCK_PHASES or app.failed_version) and app.message:
            parts.append(f"{app.name}: {app.message}")
    if status.source_error:
        parts.append(f"source: {status.source_error}")
    parts.extend(status.spec_errors[:3])
    return "; ".join(parts) or status.status


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "value"
    return f"{where}: {err.get('msg', 'invalid')}"


# Dependency drawing: one column per generation (an app right of everything it depends on).
BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 150, 36, 70, 18, 12


def dependency_layout(apps: Iterable[AppStatus]) -> dict[str, Any]:
    """Boxes and edges of a node's apps, layered by dependency generation, in SVG user units.

    An edge goes from a dependency to its dependent; dependencies on apps the node does not
    run are listed under `missing` (the loader reports them as errors on the node)."""
    by_name = {a.name: a for a in apps}
    graph = DependencyGraph.from_edges({n: a.depends_on for n, a in by_name.items()})
    generations = graph.generations()
    boxes: dict[str, dict[str, Any]] = {}
    for column, names in enumerate(generations):
        for row, name in enumerate(names):
            app = by_name[name]
            boxes[name] = {
                "app": name, "phase": app.phase, "health": app.health, "version": app.version,
                "suspended": app.suspended, "generation": column,
                "x": PAD + column * (BOX_W + GAP_X), "y": PAD + row * (BOX_H + GAP_Y),
            }
    edges = []
    missing = []
    for name, app in sorted(by_name.items()):
        for dep in app.depends_on:
            if dep not in boxes:
                missing.append({"app": name, "depends_on": dep})
                continue
            a, b = boxes[dep], boxes[name]
            edges.append({"from": dep, "to": name, "x1": a["x"] + BOX_W, "y1": a["y"] + BOX_H / 2,
                          "x2": b["x"], "y2": b["y"] + BOX_H / 2})
    rows = max((len(g) for g in generations), default=0)
    return {
        "boxes": [boxes[n] for g in generations for n in g], "edges": edges, "missing": missing,
        "box": {"w": BOX_W, "h": BOX_H},
        "width": 2 * PAD + max(len(generations), 1) * (BOX_W + GAP_X) - GAP_X,
        "height": 2 * PAD + max(rows, 1) * (BOX_H + GAP_Y) - GAP_Y,
    }


def spec_diff(desired: Any, running: Any, path: str = "") -> list[dict[str, Any]]:
    """Where two JSON specs differ, as [{path, desired, running}] with dotted paths (lists
    are compared whole). A missing side is None."""
    if isinstance(desired, dict) and isinstance(running, dict):
        out = []
        for key in sorted({*desired, *running}):
            out += spec_diff(desired.get(key), running.get(key), f"{path}.{key}" if path else key)
        return out
    if desired == running:
        return []
    return [{"path": path or "(spec)", "desired": desired, "running": running}]
