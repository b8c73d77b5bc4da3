"""console.fleet views of issue #12: the confusing numbers fixed, the Apps page, the
dependency layout and the desired-vs-running difference, asserted as whole values."""

from __future__ import annotations

from datetime import timedelta

from console import rollout_views, views
from console.filters import AppFilter
from console.fleet import Fleet
from console.layout import dependency_layout, spec_diff
from tests.test_console_fleet import REV1, REV2, T0, app, apply, event, status

T1 = T0 + timedelta(minutes=1)


def test_a_rolled_back_app_that_runs_healthy_is_counted_rolled_back_not_failed() -> None:
    fleet = Fleet()
    fleet.apply_status("n1", status("n1", "failed", apps=[
        app("web", failed_version="2.0"), app("api", failed_version="3.1"), app("db")]))
    fleet.apply_status("n2", status("n2", "failed", apps=[app("web", "failed", "unhealthy")]))
    counters = views.counters(fleet, T0)
    assert (counters["apps"], counters["apps_running"], counters["apps_failed"],
            counters["apps_rolled_back"]) == (4, 3, 1, 2)
    assert views.cards(fleet, T0)[0]["apps"] == {
        "total": 3, "running": 3, "failed": 0, "rolled_back": 2, "unhealthy": 0}


def test_a_new_rollout_counts_the_nodes_of_the_same_source_that_have_not_fetched_it() -> None:
    """Issue #12: "0/1 synced" for 3 targeted nodes. Three nodes run REV1; one fetched REV2
    first: the others follow the same source and are pending, not left out."""
    fleet = Fleet()
    for node in ("n1", "n2", "n3"):
        apply(fleet, event("reconcile.finished", node, T0, revision=REV1, outcome="success"))
        fleet.apply_status(node, status(node, revision=REV1, at=T1))
    apply(fleet, event("source.fetched", "n1", T1, revision=REV2))
    fleet.apply_status("n1", status("n1", "progressing", revision=REV1, desired_revision=REV2,
                                    at=T1))
    rows = rollout_views.recent_rollouts(fleet, T1)
    newest = rows[0]
    assert (newest["revision"], newest["synced"], newest["targeted"], newest["pending"]) == (
        REV2, 0, 3, 2)
    view = rollout_views.rollout_view(fleet, REV2, T1)
    assert view is not None
    assert (view["nodes"]["progressing"], view["nodes"]["pending"]) == (["n1"], ["n2", "n3"])


def test_a_rollout_row_counts_degraded_apart_from_failed() -> None:
    fleet = Fleet()
    fleet.apply_status("n1", status("n1", "degraded", revision=REV1))
    fleet.apply_status("n2", status("n2", "failed", revision=REV1))
    fleet.apply_status("n3", status("n3", revision=REV1))
    (row,) = rollout_views.recent_rollouts(fleet, T0)
    counters = views.counters(fleet, T0)
    assert (row["synced"], row["degraded"], row["failed"], row["targeted"]) == (1, 1, 1, 3)
    assert (row["degraded"], row["failed"]) == (counters["degraded"], counters["failed"])


def test_convergence_stops_at_the_first_success_of_the_last_node() -> None:
    """Periodic reconciles at the same revision do not move the convergence time, and a
    revision a node never reconciles successfully has none (it does not grow)."""
    fleet = Fleet()
    apply(fleet, event("source.fetched", "n1", T0, revision=REV1))
    for minute in range(5):  # n1 reconciles REV1 every minute, n2 once
        apply(fleet, event("reconcile.finished", "n1", T0 + timedelta(seconds=4, minutes=minute),
                           revision=REV1, outcome="success", duration_ms=100))
    apply(fleet, event("reconcile.finished", "n2", T0 + timedelta(seconds=7), revision=REV1,
                       outcome="success", duration_ms=100))
    apply(fleet, event("source.fetched", "n1", T0 + timedelta(minutes=9), revision=REV2))
    for minute in range(9, 14):  # n1 keeps failing REV2
        apply(fleet, event("reconcile.finished", "n1", T0 + timedelta(minutes=minute),
                           revision=REV2, outcome="failure", duration_ms=100))
    series = {p["revision"]: p for p in rollout_views.series(fleet, T0 + timedelta(minutes=15))}
    assert (series[REV1]["converged"], series[REV1]["convergence_s"]) == (True, 7.0)
    assert (series[REV2]["converged"], series[REV2]["convergence_s"]) == (False, None)
    assert series[REV2]["first_seen"] == "2026-01-01T12:09:00.000Z"  # the plot's time axis


def test_apps_view_filters_by_name_layer_and_label() -> None:
    fleet = Fleet()
    fleet.apply_status("n1", status("n1", labels={"site": "ams"}, apps=[
        app("web", layer="frontend", version="2"), app("db", layer="data")]))
    fleet.apply_status("n2", status("n2", labels={"site": "fra"}, apps=[
        app("web", layer="frontend", version="1", failed_version="2"),
        app("db", "failed", "unhealthy", layer="data", labels={"tier": "gold"})]))
    names = lambda where: [r["app"] for r in views.apps_index(fleet, where)]  # noqa: E731
    assert names(AppFilter.parse(name="WE")) == ["web"]
    assert names(AppFilter.parse(layer="data")) == ["db"]
    assert names(AppFilter.parse(labels=["tier=gold"])) == ["db"]
    web = views.apps_index(fleet, AppFilter.parse(labels=["site=fra"]))[1]
    assert (web["app"], web["nodes"], web["version_counts"], web["rolled_back"]) == (
        "web", 1, {"1": 1}, 1)
    every = {r["app"]: r for r in views.apps_view(fleet, T0)["apps"]}
    assert every["web"]["version_counts"] == {"1": 1, "2": 1}
    assert every["db"]["phases"] == {"failed": 1, "running": 1}


def test_dependency_layout_is_layered_by_generation() -> None:
    layout = dependency_layout([
        app("web", depends_on=["api"]), app("api", depends_on=["db", "cache"]),
        app("db", "failed"), app("cache"), app("cron", depends_on=["gone"])])
    columns = {b["app"]: (b["generation"], b["phase"]) for b in layout["boxes"]}
    assert columns == {"cache": (0, "running"), "cron": (0, "running"), "db": (0, "failed"),
                       "api": (1, "running"), "web": (2, "running")}
    assert sorted((e["from"], e["to"]) for e in layout["edges"]) == [
        ("api", "web"), ("cache", "api"), ("db", "api")]
    assert layout["missing"] == [{"app": "cron", "depends_on": "gone"}]
    box = {b["app"]: b for b in layout["boxes"]}
    assert box["web"]["x"] > box["api"]["x"] > box["db"]["x"]
    assert layout["width"] >= box["web"]["x"] + layout["box"]["w"]


def test_spec_diff_names_each_differing_path() -> None:
    desired = {"version": "2", "run": {"command": ["a", "b"], "env": {"K": "***"}},
               "depends_on": ["db"]}
    running = {"version": "1", "run": {"command": ["a", "b"], "env": {}}, "depends_on": ["db"]}
    assert spec_diff(desired, running) == [
        {"path": "run.env.K", "desired": "***", "running": None},
        {"path": "version", "desired": "2", "running": "1"},
    ]
    assert spec_diff(desired, desired) == []
