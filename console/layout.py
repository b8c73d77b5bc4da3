"""Pure layout helpers: a node's apps as boxes and edges for drawing, and a JSON spec diff."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from reconciler.core.graph import DependencyGraph
from reconciler.core.status import AppStatus

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
