"""The console API's OpenAPI 3.1 description, hand-written so it stays exact. Pure."""

from __future__ import annotations

from typing import Any

_JSON = {"application/json": {"schema": {"type": "object"}}}
_ERROR = {
    "description": "error",
    "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"],
    }}},
}


def _param(name: str, where: str, description: str, required: bool = False,
           schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "description": description, "schema": schema or {"type": "string"}}


_NODE_FILTERS = [
    _param("label", "query", "k=v label the node must have (repeatable)"),
    _param("layer", "query", "only nodes running an app of this layer"),
    _param("status", "query", "synced | progressing | degraded | failed | suspended | "
                              "unreachable"),
]


def _get(summary: str, params: list[dict[str, Any]] | None = None,
         not_found: bool = False) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "OK", "content": _JSON}}
    if not_found:
        responses["404"] = _ERROR
    responses["400"] = _ERROR
    return {"get": {"summary": summary, "parameters": params or [], "responses": responses}}


def _post(summary: str, params: list[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "parameters": [*params, _param("X-CSRF-Token", "header",
                                       "double-submit CSRF token (browsers only)")],
        "security": [{"bearer": []}],
        "requestBody": {"required": False,
                        "content": {"application/json": {"schema": body}}},
        "responses": {
            "200": {"description": "the node's reply", "content": _JSON},
            "400": _ERROR, "401": _ERROR, "403": _ERROR,
            "503": {**_ERROR, "description": "NATS down or no node answers"},
            "504": {**_ERROR, "description": "the node did not reply in time"},
        },
    }}


def document(actions: bool = True) -> dict[str, Any]:
    """OpenAPI document; action endpoints only when the console runs with actions. Every
    action needs an operator token and publishes an audit event
    `gitops.events.console.action.<action>` (data: actor, role, action, status, target)."""
    node = _param("node", "path", "node id")
    paths: dict[str, Any] = {
        "/api/fleet": _get("counters, node cards, filter choices, recent rollouts, series",
                           _NODE_FILTERS),
        "/api/nodes": _get("node cards (filterable)", _NODE_FILTERS),
        "/api/nodes/{node}": _get("one node: card, full status, recent events", [node], True),
        "/api/apps": _get(
            "every app across the fleet: nodes, versions in use with node counts "
            "(version_counts), nodes per phase and health, failed, rolled_back", [
                _param("name", "query", "part of the app name (case-insensitive)"),
                _param("layer", "query", "only apps of this layer"),
                _param("label", "query", "k=v of the app's labels or its node's (repeatable)"),
            ]),
        "/api/apps/{app}/spec": _get(
            "the app's spec as a node runs it (`running`) and as its checkout wants it "
            "(`desired`), from the node's `state` RPC with env values `***`, and `diff`: "
            "[{path, desired, running}] where they differ",
            [_param("app", "path", "app name"), _param("node", "query", "node id", True)], True),
        "/api/apps/{app}/logs": {"get": {
            **_get("the tail of the app's log on a node (the node's `logs` RPC, bounded): "
                   "{lines, cursor, more, truncated}; pass `cursor` back for what follows. "
                   "Needs a viewer or operator token when the console has tokens", [
                       _param("app", "path", "app name"),
                       _param("node", "query", "node id", True),
                       _param("lines", "query", "how many (1..1000, default 200)",
                              schema={"type": "integer"}),
                       _param("cursor", "query", "cursor of the previous answer")],
                   True)["get"],
            "security": [{"bearer": []}]}},
        "/api/nodes/{node}/graph": _get(
            "the node's apps laid out by dependency generation: boxes {app, phase, health, "
            "generation, x, y}, edges {from, to, x1, y1, x2, y2}, missing dependencies",
            [node], True),
        "/api/history": _get(
            "revision history of --repo: commits {revision, subject, author, time, apps, "
            "files, nodes}; `selected` is the commit of ?revision= (full SHA or prefix)",
            [_param("revision", "query", "a revision to select")]),
        "/api/apps/{app}": _get("one app across nodes", [_param("app", "path", "app name")],
                                True),
        "/api/rollouts/{revision}": _get(
            "rollout of a revision (full SHA or unique prefix): buckets, failing nodes, "
            "superseded_by, from_events (nodes that moved on, counted from events), "
            "coordination (the gitops_rollouts entry when rollout.yaml governs it: state, "
            "reason, waves with progress and bake_left_s, the actions that apply)",
            [_param("revision", "path", "git revision")], True),
        "/api/events": _get("event log, newest first", [
            _param("node", "query", "only this node"), _param("app", "query", "only this app"),
            _param("type", "query", "exact type, or a prefix ending in '.' or '*'"),
            _param("limit", "query", "at most this many (1..5000, default 200)",
                   schema={"type": "integer"}),
        ]),
        "/api/series": _get("reconcile duration and convergence time per revision", [
            _param("hours", "query", "window (default 6)", schema={"type": "number"})]),
        "/api/health": _get("the console's NATS feed state; rejected (bad values) and forged "
                            "(event body not matching its subject) counts"),
        "/api/stream/{kind}": {"get": {
            "summary": "server-sent events: the view of `kind` (overview, node, app, rollout, "
                       "events, apps, history) whenever it changes, at most every 250 ms",
            "parameters": [_param("kind", "path", "view"),
                           _param("name", "query", "node id / app name / revision"),
                           _param("revision", "query", "history: the revision to select")],
            "responses": {"200": {"description": "text/event-stream"}},
        }},
    }
    if actions:
        app_body = {"type": "object", "properties": {"app": {"type": "string"}}}
        for action in ("reconcile", "health", "suspend", "resume"):
            paths[f"/api/nodes/{{node}}/{action}"] = _post(
                f"RPC gitops.rpc.<node>.{action}", [node],
                {"type": "object"} if action == "reconcile" else app_body)
        rev = _param("revision", "path", "git revision (full SHA or unique prefix)")
        for action, what in (("pause", "no node starts the revision until resumed"),
                             ("resume", "nodes go on"),
                             ("abort", "nodes that applied it revert; the others never start "
                                       "it (body: {\"reason\": ...})"),
                             ("promote", "open the next wave now, skipping the bake")):
            paths[f"/api/rollouts/{{revision}}/{action}"] = _post(
                f"rollout {action}: {what}; a compare-and-set on gitops_rollouts (409 when "
                "the action does not apply to the rollout's state)", [rev],
                {"type": "object", "properties": {"reason": {"type": "string"}}})
            paths[f"/api/rollouts/{{revision}}/{action}"]["post"]["responses"]["409"] = _ERROR
        paths["/api/fleet/reconcile"] = _post(
            "gitops.fleet.reconcile: every matching node replies {node, run_id} (~1 s)", [],
            {"type": "object", "properties": {"selector": {"type": "object"}}})
        paths["/api/fleet/health"] = _post(
            "RPC gitops.rpc.<node>.health to each given node (probe now): {count, healthy, "
            "unhealthy, results: [{node, ok, apps, unhealthy} | {node, ok: false, error, "
            "code}]}", [],
            {"type": "object", "required": ["nodes"],
             "properties": {"nodes": {"type": "array", "items": {"type": "string"}}}})
        paths["/api/nodes/{node}/forget"] = _post(
            "delete the node's status from the gitops_nodes bucket (a node that is alive "
            "puts it again with its next heartbeat)", [node], {"type": "object"})
    return {
        "openapi": "3.1.0",
        "info": {"title": "gitops-mesh console", "version": "1"},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
