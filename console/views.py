"""Pure views of a Fleet (its state + an injected now): overview, cards, nodes, apps."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from console.filters import STATUSES, AppFilter, EventFilter, NodeFilter
from console.fleet import Fleet
from console.layout import dependency_layout
from console.rollout_views import active_rollouts, recent_rollouts
from reconciler.core.events import iso_time
from reconciler.core.states import STUCK_PHASES
from reconciler.core.status import AppStatus, NodeStatus


def card(fleet: Fleet, status: NodeStatus, now: datetime) -> dict[str, Any]:
    """One node's overview card (built once per status and derived state; treat it as
    read-only: the same dict is handed out again while nothing changed)."""
    state = fleet.node_state(status, now)
    cached = fleet.memo.cards.get(status.node)
    if cached is not None and cached[0] is status and cached[1] == state:
        return cached[2]
    built = _build_card(status, state)
    if fleet.nodes.get(status.node) is status:
        fleet.memo.cards[status.node] = (status, state, built)
    return built


def _build_card(status: NodeStatus, state: str) -> dict[str, Any]:
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
            "rolled_back": sum(rolled_back(a) for a in apps),
            "unhealthy": sum(a.health == "unhealthy" for a in apps),
        },
        "updated_at": status.updated_at,
        "last_reconcile_at": status.last_reconcile_at,
        "last_reconcile_ms": status.last_reconcile_ms,
        "agent_version": status.agent_version,
    }


def cards(fleet: Fleet, now: datetime, where: NodeFilter | None = None) -> list[dict[str, Any]]:
    built = [card(fleet, fleet.nodes[n], now) for n in sorted(fleet.nodes)]
    return [c for c in built if where is None or where.matches(c)]


def counters(fleet: Fleet, now: datetime,
             every_card: list[dict[str, Any]] | None = None) -> dict[str, int]:
    """Nodes per status and app totals (from `every_card`, all cards unfiltered, if given)."""
    counts = dict.fromkeys(STATUSES, 0)
    apps_running = apps_failed = apps_total = apps_rolled_back = 0
    for one in every_card if every_card is not None else cards(fleet, now):
        counts[one["status"]] = counts.get(one["status"], 0) + 1
        apps_total += one["apps"]["total"]
        apps_running += one["apps"]["running"]
        apps_failed += one["apps"]["failed"]
        apps_rolled_back += one["apps"]["rolled_back"]
    return {
        "nodes": len(fleet.nodes), **counts,
        "apps": apps_total, "apps_running": apps_running, "apps_failed": apps_failed,
        "apps_rolled_back": apps_rolled_back,
    }


def filter_choices(fleet: Fleet) -> dict[str, Any]:
    """Label keys/values and layers present in the fleet, for the overview's filters."""
    labels: dict[str, set[str]] = {}
    layers: set[str] = set()
    for status in fleet.nodes.values():
        for key, value in status.labels.items():
            labels.setdefault(key, set()).add(value)
        layers.update(a.layer for a in status.apps if a.layer)
    return {
        "labels": {k: sorted(v) for k, v in sorted(labels.items())},
        "layers": sorted(layers),
        "statuses": list(STATUSES),
    }


def overview(fleet: Fleet, now: datetime, where: NodeFilter | None = None) -> dict[str, Any]:
    every_card = cards(fleet, now)  # once for the counters and the (filtered) cards
    return {
        "now": iso_time(now),
        "counters": counters(fleet, now, every_card),
        "nodes": every_card if where is None else [c for c in every_card if where.matches(c)],
        "filters": filter_choices(fleet),
        "rollouts": recent_rollouts(fleet, now),
        "active_rollouts": active_rollouts(fleet, now),
    }


def node_view(fleet: Fleet, node: str, now: datetime, events: int = 50
              ) -> dict[str, Any] | None:
    status = fleet.nodes.get(node)
    if status is None:
        return None
    return {
        "now": iso_time(now),
        "card": card(fleet, status, now),
        "status": status.model_dump(mode="json"),
        "events": fleet.event_log(EventFilter(node=node), events),
        "graph": dependency_layout(status.apps),
    }


def dependency_view(fleet: Fleet, node: str) -> dict[str, Any] | None:
    """The node's apps laid out for drawing: see layout.dependency_layout."""
    status = fleet.nodes.get(node)
    return None if status is None else dependency_layout(status.apps)


def app_view(fleet: Fleet, name: str, now: datetime, events: int = 50) -> dict[str, Any] | None:
    rows = []
    versions: dict[str, int] = {}
    phases: dict[str, int] = {}
    for node in sorted(fleet.nodes):
        status = fleet.nodes[node]
        for app in status.apps:
            if app.name != name:
                continue
            rows.append({
                "node": node,
                "node_status": fleet.node_state(status, now),
                **app.model_dump(mode="json", exclude={"name", "depends_on", "labels"}),
            })
            versions[app.version] = versions.get(app.version, 0) + 1
            phases[app.phase] = phases.get(app.phase, 0) + 1
    log = fleet.event_log(EventFilter(app=name), events)
    if not rows and not log:
        return None
    return {
        "now": iso_time(now), "app": name, "nodes": rows,
        "versions": dict(sorted(versions.items())), "phases": dict(sorted(phases.items())),
        "events": log,
    }


def apps_index(fleet: Fleet, where: AppFilter | None = None) -> list[dict[str, Any]]:
    """Every app across the fleet: nodes running it, versions in use with node counts,
    nodes per phase and per health; `where` filters by name, layer and label."""
    index: dict[str, dict[str, Any]] = {}
    for node in sorted(fleet.nodes):
        status = fleet.nodes[node]
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
            row["rolled_back"] += rolled_back(app)
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


def apps_view(fleet: Fleet, now: datetime, where: AppFilter | None = None) -> dict[str, Any]:
    """The Apps page: every app (filtered) and the choices for its filters."""
    choices = filter_choices(fleet)
    return {"now": iso_time(now), "apps": apps_index(fleet, where),
            "filters": {"layers": choices["layers"], "labels": choices["labels"]},
            "nodes": len(fleet.nodes)}


def rolled_back(app: AppStatus) -> bool:
    """An upgrade to `failed_version` was rolled back and the app runs its previous one."""
    return bool(app.failed_version) and app.phase not in STUCK_PHASES
