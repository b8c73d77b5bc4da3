"""console.fleet and its views: statuses and events applied, views asserted as whole values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from console import rollout_views, views
from console.filters import EventFilter, NodeFilter
from console.fleet import Fleet
from reconciler.core.events import Event, make_event
from reconciler.core.status import AppStatus, NodeStatus

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
REV1 = "a" * 40
REV2 = "b" * 40


def iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status(node: str, state: str = "synced", *, at: datetime = T0, **kw: Any) -> bytes:
    return NodeStatus(node=node, status=state, updated_at=iso(at), **kw).to_json_bytes()


def app(name: str, phase: str = "running", health: str = "healthy", **kw: Any) -> AppStatus:
    return AppStatus(name=name, version=kw.pop("version", "1.0"), phase=phase, health=health,
                     **kw)


def event(type: str, node: str, at: datetime = T0, eid: str = "", **kw: Any) -> bytes:
    return make_event(type, node, at, event_id=eid or None, **kw).to_json_bytes()


def apply(fleet: Fleet, data: bytes) -> str | None:
    """Apply an event as the stream delivers it: on the subject its node published it on."""
    return fleet.apply_event(Event.model_validate_json(data).subject, data)


def test_counters_and_cards_with_unreachable_derived_from_heartbeat_age() -> None:
    fleet = Fleet()
    fleet.apply_status("n1", status("n1", labels={"role": "edge"}, revision=REV1,
                                    apps=[app("web", layer="frontend"), app("db")]))
    fleet.apply_status("n2", status("n2", "failed", revision=REV1, message="failed: web",
                                    apps=[app("web", "failed", "unhealthy", message="exit 1")]))
    # heartbeat 10s: 31s of silence is more than 3 missed heartbeats
    fleet.apply_status("n3", status("n3", at=T0 - timedelta(seconds=31)))
    now = T0 + timedelta(seconds=0.5)

    assert views.counters(fleet, now) == {
        "nodes": 3, "synced": 1, "progressing": 0, "degraded": 0, "failed": 1,
        "suspended": 0, "unreachable": 1, "apps": 3, "apps_running": 2, "apps_failed": 1,
        "apps_rolled_back": 0,
    }
    assert views.cards(fleet, now, NodeFilter.parse(["role=edge"])) == [{
        "node": "n1", "status": "synced", "reported_status": "synced", "message": "",
        "revision": REV1, "desired_revision": None, "labels": {"role": "edge"},
        "layers": ["frontend"],
        "apps": {"total": 2, "running": 2, "failed": 0, "rolled_back": 0, "unhealthy": 0},
        "updated_at": iso(T0), "last_reconcile_at": None, "last_reconcile_ms": None,
        "agent_version": "",
    }]
    def shown(where: NodeFilter) -> list[str]:
        return [c["node"] for c in views.cards(fleet, now, where)]

    assert shown(NodeFilter.parse(status="unreachable")) == ["n3"]
    assert shown(NodeFilter.parse(layer="frontend")) == ["n1"]
    # unreachable is shown, never dropped: the node is still there with its last report
    assert [c["node"] for c in views.cards(fleet, now)] == ["n1", "n2", "n3"]


def test_node_filter_rejects_bad_clauses_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="label filter 'role': expected KEY=VALUE"):
        NodeFilter.parse(["role"])
    with pytest.raises(ValueError, match="status filter 'fine'"):
        NodeFilter.parse(status="fine")


def test_bad_values_are_rejected_and_change_nothing() -> None:
    fleet = Fleet()
    fleet.apply_status("n1", status("n1"))
    before = fleet.version
    assert fleet.apply_status("n1", b"{not json") is not None
    assert fleet.apply_status("n1", status("n2")) == (
        "KV key 'n1': status is for node 'n2'")
    assert fleet.apply_event("gitops.events.n1.app.deployed", b'{"id": "x"}') is not None
    assert (fleet.version, fleet.rejected, list(fleet.nodes)) == (before, 3, ["n1"])
    # a deleted key removes the node (an operator decommissioned it)
    assert fleet.apply_status("n1", None) is None
    assert fleet.nodes == {}


def test_an_event_whose_body_names_another_node_than_its_subject_is_rejected() -> None:
    fleet = Fleet()
    apply(fleet, event("source.fetched", "n2", T0, eid="real", revision=REV1))
    before = (fleet.version, fleet.events_total, fleet.event_log(), rollout_views.series(fleet, T0))
    # n1 may publish only on gitops.events.n1.>: its event claiming to be n2's is a forgery
    forged = event("reconcile.finished", "n2", T0, eid="forged", revision=REV1,
                   outcome="success", duration_ms=5)
    assert fleet.apply_event("gitops.events.n1.reconcile.finished", forged) == (
        "event forged on gitops.events.n1.reconcile.finished claims to be "
        "'reconcile.finished' of node 'n2' (expected subject "
        "gitops.events.n2.reconcile.finished): ignored")
    # the type is part of the subject too
    assert fleet.apply_event("gitops.events.n2.app.deployed", forged) is not None
    assert fleet.apply_event("gitops.events.n2", forged) is not None
    # n1's permissions allow gitops.events.n1.n2.app.deployed: a dotted "node" is refused
    dotted = event("app.deployed", "n1.n2", T0, eid="dotted")
    assert fleet.apply_event("gitops.events.n1.n2.app.deployed", dotted) == (
        "event dotted on gitops.events.n1.n2.app.deployed: node 'n1.n2' is not a valid "
        "node id: ignored")
    assert (fleet.version, fleet.events_total, fleet.event_log(),
            rollout_views.series(fleet, T0)) == before
    assert (fleet.rejected, fleet.forged) == (4, 4)
    # the same event on its own subject is applied
    assert fleet.apply_event("gitops.events.n2.reconcile.finished", forged) is None
    assert [e["id"] for e in fleet.event_log()] == ["forged", "real"]


def test_event_log_is_bounded_newest_first_and_filterable() -> None:
    fleet = Fleet(events_keep=3)
    for i, (typ, node, app_name) in enumerate([
        ("app.deployed", "n1", "web"), ("app.failed", "n2", "web"),
        ("app.deployed", "n2", "db"), ("reconcile.finished", "n1", None),
    ]):
        apply(fleet, event(typ, node, T0 + timedelta(seconds=i), eid=f"e{i}", app=app_name))

    assert [e["id"] for e in fleet.event_log()] == ["e3", "e2", "e1"]  # e0 fell out
    assert fleet.event_log(EventFilter(node="n2", app="web")) == [{
        "schema": 1, "id": "e1", "type": "app.failed", "node": "n2",
        "time": iso(T0 + timedelta(seconds=1)), "app": "web",
    }]
    assert [e["id"] for e in fleet.event_log(EventFilter(type="app."))] == ["e2", "e1"]
    assert [e["id"] for e in fleet.event_log(EventFilter(type="app.deployed"))] == ["e2"]
    # a late arrival from an outbox that drained after an outage sorts by its own time
    apply(fleet, event("app.deployed", "n3", T0 + timedelta(seconds=2.5), eid="late"))
    assert [e["id"] for e in fleet.event_log()] == ["e3", "late", "e2"]
    assert fleet.events_total == 5


def test_rollout_view_buckets_targeted_nodes_and_lists_failing_ones_with_errors() -> None:
    fleet = Fleet()
    fleet.apply_status("done", status("done", revision=REV2))
    fleet.apply_status("busy", status("busy", "progressing", revision=REV1,
                                      desired_revision=REV2))
    fleet.apply_status("broke", status(
        "broke", "failed", revision=REV1, desired_revision=REV2, message="failed: web",
        apps=[app("web", "running", failed_version="2.0", message="health check failed")]))
    fleet.apply_status("late", status("late", revision=REV1))      # only fetched it
    fleet.apply_status("other", status("other", revision=REV1))    # not targeted
    fleet.apply_status("gone", status("gone", revision=REV2, at=T0 - timedelta(minutes=5)))
    apply(fleet, event("source.fetched", "late", T0, revision=REV2))
    apply(fleet, event("reconcile.finished", "done", T0 + timedelta(seconds=4),
                            revision=REV2, outcome="success", duration_ms=1500))

    assert rollout_views.rollout_view(fleet, REV2[:7], T0) == {
        "now": iso(T0), "revision": REV2, "targeted": 5,
        "counts": {"synced": 1, "progressing": 1, "degraded": 0, "failed": 1, "pending": 1,
                   "suspended": 0, "unreachable": 1},
        "nodes": {"synced": ["done"], "progressing": ["busy"], "degraded": [],
                  "failed": ["broke"], "pending": ["late"], "suspended": [],
                  "unreachable": ["gone"]},
        "failing": [{"node": "broke", "status": "failed",
                     "error": "failed: web; web: health check failed"}],
        "progress": 0.2,
        "first_seen": iso(T0),
        "last_success": iso(T0 + timedelta(seconds=4)),
        "superseded_by": None,
        "from_events": [], "coordination": None,
    }
    assert rollout_views.rollout_view(fleet, "ffffffff", T0) is None


def test_a_superseded_revision_shows_how_its_rollout_went_from_the_events() -> None:
    fleet = Fleet()
    for i, (node, ok) in enumerate([("n1", True), ("n2", True), ("n3", False)]):
        apply(fleet, event("source.fetched", node, T0, revision=REV1))
        apply(fleet, event("reconcile.finished", node, T0 + timedelta(seconds=2 + i),
                           revision=REV1, outcome="success" if ok else "failure",
                           message=None if ok else "web: health check failed"))
    # a node following another branch saw its own revision in between: not a successor
    apply(fleet, event("source.fetched", "staging", T0 + timedelta(seconds=30),
                       revision="c" * 40))
    # REV2 is pushed a minute later: every node fetches it and moves on
    later = T0 + timedelta(seconds=60)
    for node in ("n1", "n2", "n3"):
        apply(fleet, event("source.fetched", node, later, revision=REV2))
    fleet.apply_status("n1", status("n1", revision=REV2, at=later))
    fleet.apply_status("n2", status("n2", "progressing", revision=REV1, desired_revision=REV2,
                                    at=later))
    fleet.apply_status("n3", status("n3", revision=REV2, at=later))
    now = later + timedelta(seconds=1)

    assert rollout_views.rollout_view(fleet, REV1, now) == {
        "now": iso(now), "revision": REV1, "targeted": 3,
        "counts": {"synced": 2, "progressing": 0, "degraded": 0, "failed": 1, "pending": 0,
                   "suspended": 0, "unreachable": 0},
        "nodes": {"synced": ["n1", "n2"], "progressing": [], "degraded": [],
                  "failed": ["n3"], "pending": [], "suspended": [], "unreachable": []},
        "failing": [{"node": "n3", "status": "failed", "error": "web: health check failed"}],
        "progress": 0.6667,
        "first_seen": iso(T0),
        "last_success": iso(T0 + timedelta(seconds=3)),
        "superseded_by": REV2,
        "from_events": ["n1", "n2", "n3"], "coordination": None,
    }
    # the overview's recent rollouts keep it, with how it went
    assert [(r["revision"], r["synced"], r["failed"], r["targeted"])
            for r in rollout_views.recent_rollouts(fleet, now)
            ] == [(REV2, 2, 0, 3), (REV1, 2, 1, 3)]


def test_no_last_sync_time_while_no_targeted_node_is_synced() -> None:
    fleet = Fleet()
    apply(fleet, event("source.fetched", "n1", T0, revision=REV2))
    apply(fleet, event("reconcile.finished", "n1", T0 + timedelta(seconds=2), revision=REV2,
                       outcome="success"))
    # n1 synced at REV2 once, but is degraded now; n2 is still on its way
    fleet.apply_status("n1", status("n1", "degraded", revision=REV2, message="web unhealthy",
                                    at=T0 + timedelta(seconds=9)))
    fleet.apply_status("n2", status("n2", "progressing", revision=REV1, desired_revision=REV2,
                                    at=T0 + timedelta(seconds=9)))
    now = T0 + timedelta(seconds=10)

    assert rollout_views.rollout_view(fleet, REV2, now) == {
        "now": iso(now), "revision": REV2, "targeted": 2,
        "counts": {"synced": 0, "progressing": 1, "degraded": 1, "failed": 0, "pending": 0,
                   "suspended": 0, "unreachable": 0},
        "nodes": {"synced": [], "progressing": ["n2"], "degraded": ["n1"], "failed": [],
                  "pending": [], "suspended": [], "unreachable": []},
        "failing": [{"node": "n1", "status": "degraded", "error": "web unhealthy"}],
        "progress": 0.0,
        "first_seen": iso(T0),
        "last_success": None,
        "superseded_by": None,
        "from_events": [], "coordination": None,
    }


def test_series_gives_durations_and_convergence_per_revision_in_the_window() -> None:
    fleet = Fleet()
    old = T0 - timedelta(hours=7)
    apply(fleet, event("source.fetched", "n1", old, revision="c" * 40))
    apply(fleet, event("source.fetched", "n1", T0, revision=REV1))
    apply(fleet, event("reconcile.finished", "n1", T0 + timedelta(seconds=2),
                            revision=REV1, outcome="success", duration_ms=1000))
    apply(fleet, event("reconcile.finished", "n2", T0 + timedelta(seconds=9),
                            revision=REV1, outcome="success", duration_ms=3000))
    apply(fleet, event("reconcile.finished", "n3", T0 + timedelta(seconds=5),
                            revision=REV1, outcome="failure", duration_ms=200))

    assert rollout_views.series(fleet, T0 + timedelta(minutes=1)) == [{
        "revision": REV1, "first_seen": iso(T0), "reconciles": 3, "failures": 1,
        "mean_ms": 1400.0, "max_ms": 3000.0, "nodes_synced": 2, "nodes_seen": 3,
        # n3 saw the revision and never reconciled it successfully: not converged
        "converged": False, "convergence_s": None,
    }]


def test_app_view_across_nodes() -> None:
    fleet = Fleet()
    fleet.apply_status("n1", status("n1", apps=[app("web", version="2.0", restarts=1)]))
    fleet.apply_status("n2", status("n2", "failed", apps=[app("web", "failed", "unhealthy")]))
    fleet.apply_status("n3", status("n3", apps=[app("db")]))
    view = views.app_view(fleet, "web", T0)
    assert view is not None
    assert (view["versions"], view["phases"]) == ({"1.0": 1, "2.0": 1},
                                                  {"failed": 1, "running": 1})
    assert view["nodes"][0] == {
        "node": "n1", "node_status": "synced", "version": "2.0", "phase": "running",
        "health": "healthy", "message": "", "layer": None, "suspended": False,
        "failed_version": None, "restarts": 1, "pid": None, "started_at": None,
        "uptime_s": None, "cpu_percent": None, "rss_bytes": None,
    }
    assert views.app_view(fleet, "nope", T0) is None
    assert views.apps_index(fleet) == [
        {"app": "db", "nodes": 1, "running": 1, "failed": 0, "rolled_back": 0, "unhealthy": 0,
         "versions": ["1.0"], "version_counts": {"1.0": 1}, "phases": {"running": 1},
         "health": {"healthy": 1}, "layer": None, "labels": {}, "depends_on": []},
        {"app": "web", "nodes": 2, "running": 1, "failed": 1, "rolled_back": 0, "unhealthy": 1,
         "versions": ["1.0", "2.0"], "version_counts": {"1.0": 1, "2.0": 1},
         "phases": {"failed": 1, "running": 1}, "health": {"healthy": 1, "unhealthy": 1},
         "layer": None, "labels": {}, "depends_on": []},
    ]


def test_recent_rollouts_summarise_the_newest_revisions() -> None:
    fleet = Fleet()
    fleet.apply_status("n1", status("n1", revision=REV1))
    fleet.apply_status("n2", status("n2", "progressing", revision=REV1, desired_revision=REV2))
    apply(fleet, event("source.fetched", "n2", T0, revision=REV2))
    assert rollout_views.recent_rollouts(fleet, T0) == [
        {"revision": REV2, "targeted": 1, "synced": 0, "failed": 0, "degraded": 0,
         "pending": 0, "progress": 0.0, "first_seen": iso(T0)},
        # n2 moved on to REV2: it is no longer part of the REV1 rollout
        {"revision": REV1, "targeted": 1, "synced": 1, "failed": 0, "degraded": 0,
         "pending": 0, "progress": 1.0, "first_seen": None},
    ]


def test_a_card_follows_its_heartbeat_age_and_new_statuses() -> None:
    fleet = Fleet()
    fleet.apply_status("n1", status("n1"))
    assert views.cards(fleet, T0)[0]["status"] == "synced"
    assert views.cards(fleet, T0 + timedelta(seconds=31))[0]["status"] == "unreachable"
    assert views.cards(fleet, T0)[0]["status"] == "synced"  # a heartbeat's age, not a latch
    fleet.apply_status("n1", status("n1", "degraded", at=T0 + timedelta(seconds=40)))
    assert [(c["status"], c["updated_at"]) for c in views.cards(fleet, T0 + timedelta(seconds=41))
            ] == [("degraded", iso(T0 + timedelta(seconds=40)))]


def test_per_node_rollout_reports_in_the_rollouts_bucket_are_not_rollout_entries() -> None:
    """gitops_rollouts may also hold `<sha>.<node>` keys (one node's report on a rollout):
    the console skips them, neither as an entry nor as a rejected value."""
    fleet = Fleet()
    before = fleet.version
    report = b'{"node": "n1", "revision": "' + REV1.encode() + b'", "state": "applied"}'
    assert fleet.apply_rollout(f"{REV1}.n1", report) is None
    assert fleet.apply_rollout(f"{REV1}.n1", None) is None  # its deletion too
    assert (fleet.coordinated, fleet.rejected, fleet.version) == ({}, 0, before)


def test_the_lineage_follows_new_sightings_after_it_was_read() -> None:
    """Lineage heads are memoised: a revision seen by a node of the same source later must
    still supersede (the memo is dropped when sightings change, not on every event)."""
    fleet = Fleet()
    apply(fleet, event("source.fetched", "n1", T0, revision=REV1))
    apply(fleet, event("source.fetched", "n2", T0 + timedelta(seconds=1), revision=REV2))
    # n2 follows another source: REV2 does not supersede REV1
    assert rollout_views.lineage_head(fleet, REV1) is None
    apply(fleet, event("reconcile.finished", "n1", T0 + timedelta(seconds=2), revision=REV1,
                       outcome="success"))
    assert rollout_views.lineage_head(fleet, REV1) is None
    apply(fleet, event("source.fetched", "n1", T0 + timedelta(seconds=3), revision=REV2))
    assert rollout_views.lineage_head(fleet, REV1) == REV2
    assert rollout_views.superseded_by(fleet, REV1) == REV2
