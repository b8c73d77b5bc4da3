"""Pure views of rollouts (fleet state + injected now): buckets, lineage, waves, series."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from console.fleet import Fleet
from reconciler.core.events import iso_time
from reconciler.core.rollout import ACTIVE_STATES, OPERATOR_ACTIONS, bake_left, wave_rows
from reconciler.core.states import STUCK_PHASES
from reconciler.core.status import UNREACHABLE, NodeStatus

ROLLOUT_BUCKETS: tuple[str, ...] = (
    "synced", "progressing", "degraded", "failed", "pending", "suspended", UNREACHABLE,
)


def coordination(fleet: Fleet, revision: str, now: datetime) -> dict[str, Any] | None:
    """The coordinated rollout of `revision` as the console shows it: state, reason,
    waves with progress and the bake countdown, and which operator actions apply."""
    entry = fleet.coordinated.get(revision)
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


def active_rollouts(fleet: Fleet, now: datetime, limit: int = 5) -> list[dict[str, Any]]:
    """Coordinated rollouts in progress (or paused), newest first, with their waves."""
    active = sorted((e for e in fleet.coordinated.values() if e.state in ACTIVE_STATES),
                    key=lambda e: e.created_at, reverse=True)[:limit]
    return [view for e in active if (view := coordination(fleet, e.revision, now))]


def resolve_revision(fleet: Fleet, prefix: str) -> str | None:
    """A full revision from a unique prefix (short SHA), or None."""
    known = set(fleet.revisions) | set(fleet.coordinated)
    for status in fleet.nodes.values():
        known.update(r for r in (status.revision, status.desired_revision) if r)
    if prefix in known:
        return prefix
    matches = {r for r in known if r.startswith(prefix)} if len(prefix) >= 4 else set()
    return matches.pop() if len(matches) == 1 else None


def rollout_bucket(fleet: Fleet, status: NodeStatus, revision: str, now: datetime
                   ) -> str | None:
    """Where a node stands in the rollout of `revision`, or None if it is not targeted.

    A node targets its desired revision (or, without one, the revision it runs); a node
    whose latest fetch saw `revision` but whose status does not show it yet is pending.
    A node that moved on to another revision is no longer part of this rollout.
    """
    reported = status.revision == revision
    target = status.desired_revision or status.revision
    if target != revision:
        heading = (fleet.fetched.get(status.node) == revision
                   or (target is not None and lineage_head(fleet, target) == revision))
        if heading and not reported:
            state = fleet.node_state(status, now)
            return state if state in (UNREACHABLE, "suspended") else "pending"
        return None
    state = fleet.node_state(status, now)
    if state in (UNREACHABLE, "suspended", "failed"):
        return state
    if reported:
        return state if state in ("synced", "degraded") else "progressing"
    return "progressing"


def rollout_view(fleet: Fleet, revision: str, now: datetime) -> dict[str, Any] | None:
    """Where the rollout of `revision` stands, node by node.

    Nodes at (or heading for) the revision are placed by their live status. Nodes that
    have moved on (the revision was superseded) are placed by how it went for them
    here, from the events in memory: synced if a reconcile at it succeeded, failed if
    it only failed; they are listed in `from_events`.
    """
    full = resolve_revision(fleet, revision)
    if full is None:
        return None
    stats = fleet.revisions.get(full)
    buckets: dict[str, list[str]] = {b: [] for b in ROLLOUT_BUCKETS}
    failing = []
    from_events = []
    names = set(fleet.nodes)
    if stats is not None:
        names.update(stats.nodes_ok, stats.nodes_failed)
    for node in sorted(names):
        status = fleet.nodes.get(node)
        bucket = rollout_bucket(fleet, status, full, now) if status is not None else None
        if bucket is not None:
            buckets[bucket].append(node)
            if bucket in ("failed", "degraded"):
                assert status is not None
                failing.append({"node": node, "status": bucket, "error": node_error(status)})
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
        "superseded_by": superseded_by(fleet, full),
        "from_events": from_events,
        "coordination": coordination(fleet, full, now),
    }


def lineage_head(fleet: Fleet, revision: str) -> str | None:
    """The newest revision that (transitively) supersedes `revision`, or None when none
    does: a node still at `revision` follows the same source and will be heading there
    (a new rollout counts the nodes that have not fetched it yet as pending)."""
    memo = fleet.memo
    if memo.heads[0] != fleet.lineage_version:
        memo.heads = (fleet.lineage_version, {})
    heads = memo.heads[1]
    if revision not in heads:
        head, seen = None, {revision}
        nxt = superseded_by(fleet, revision)
        while nxt is not None and nxt not in seen:
            head = nxt
            seen.add(nxt)
            nxt = superseded_by(fleet, nxt)
        heads[revision] = head
    return heads[revision]


def superseded_by(fleet: Fleet, revision: str) -> str | None:
    """The next revision (by first sighting) seen by nodes that saw `revision`, or None
    while there is none. Nodes may follow other branches or repos: a revision of
    those does not supersede this one."""
    stats = fleet.revisions.get(revision)
    if stats is None:
        return None
    newer = [s for s in fleet.revisions.values() if s.first_seen > stats.first_seen
             and not s.nodes_seen.isdisjoint(stats.nodes_seen)]
    return min(newer, key=lambda s: s.first_seen).revision if newer else None


def recent_rollouts(fleet: Fleet, now: datetime, limit: int = 5) -> list[dict[str, Any]]:
    """The newest revisions (by first sighting) with their synced/targeted counts."""
    revs = sorted(fleet.revisions.values(), key=lambda s: s.first_seen, reverse=True)
    seen = {s.revision for s in revs}
    # Revisions only known from KV (events not replayed) still deserve a line.
    extra = sorted({s.revision for s in fleet.nodes.values() if s.revision} - seen)
    out = []
    for rev in [s.revision for s in revs] + extra:
        view = rollout_view(fleet, rev, now)
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


def series(fleet: Fleet, now: datetime, window_s: float = 6 * 3600) -> list[dict[str, Any]]:
    """Per revision seen in the window, oldest first: reconcile durations and convergence.

    Convergence = the time from the revision's first sighting (a fetch or reconcile start
    anywhere in the fleet) until the last node that saw it first reconciled it
    successfully; None (`converged` false) while some node that saw it never has. Later
    periodic reconciles at the same revision do not move it.
    """
    out = []
    for stats in sorted(fleet.revisions.values(), key=lambda s: s.first_seen):
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


def node_error(status: NodeStatus) -> str:
    """The most specific reason a node gives for failing."""
    parts = [status.message] if status.message else []
    for app in status.apps:
        if (app.phase in STUCK_PHASES or app.failed_version) and app.message:
            parts.append(f"{app.name}: {app.message}")
    if status.source_error:
        parts.append(f"source: {status.source_error}")
    parts.extend(status.spec_errors[:3])
    return "; ".join(parts) or status.status
