"""The console's JSON read API: fleet, nodes, apps, rollouts, events, streams, node reads."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console import openapi, views
from console.layout import spec_diff
from console.node_rpc import connected_nats, rpc
from console.security import authorize
from console.sse import stream
from console.state import Console
from console.web import (
    BadParam,
    app_query,
    error_response,
    event_query,
    float_param,
    json_or_404,
    json_response,
    node_query,
)
from reconciler.core.spec import NAME_RE


class ApiRoutes:
    """Read routes of one console (GET); what they return is documented in console.openapi."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.config = console.config

    def node_rpc_routes(self) -> list[Route]:
        """Reads that ask a node (spec, logs) and the graph and history, before the rest."""
        return [
            Route("/api/apps/{app}/spec", self.api_app_spec),
            Route("/api/apps/{app}/logs", self.api_app_logs),
            Route("/api/nodes/{node}/graph", self.api_node_graph),
            Route("/api/history", self.api_history),
        ]

    def routes(self) -> list[Route]:
        return [
            Route("/api/fleet", self.api_fleet),
            Route("/api/nodes", self.api_nodes),
            Route("/api/nodes/{node}", self.api_node),
            Route("/api/apps", self.api_apps),
            Route("/api/apps/{app}", self.api_app),
            Route("/api/rollouts/{revision}", self.api_rollout),
            Route("/api/events", self.api_events),
            Route("/api/series", self.api_series),
            Route("/api/health", self.api_health),
            Route("/api/openapi.json", self.api_openapi),
            Route("/api/stream/{kind}", self.api_stream),
        ]

    async def api_fleet(self, request: Request) -> Response:
        return Response(self.console.view_json("overview", node_query(request)),
                        media_type="application/json", headers={"Cache-Control": "no-store"})

    async def api_nodes(self, request: Request) -> Response:
        console = self.console
        return json_response(views.cards(console.fleet, console.clock(), node_query(request)))

    async def api_node(self, request: Request) -> Response:
        node = request.path_params["node"]
        return json_or_404(self.console.view("node", node), f"no node {node!r} in the fleet")

    async def api_apps(self, request: Request) -> Response:
        return json_response(views.apps_index(self.console.fleet, app_query(request)))

    async def api_app(self, request: Request) -> Response:
        name = request.path_params["app"]
        return json_or_404(self.console.view("app", name), f"no app {name!r} on any node")

    async def api_rollout(self, request: Request) -> Response:
        rev = request.path_params["revision"]
        return json_or_404(self.console.view("rollout", rev),
                           f"revision {rev!r} is not known (or the prefix is ambiguous)")

    async def api_events(self, request: Request) -> Response:
        where, limit = event_query(request)
        return json_response(self.console.view("events", where, limit)["events"])

    async def api_series(self, request: Request) -> Response:
        hours = float_param(request, "hours", 6.0, 0.01, 24 * 7)
        return json_response(self.console.view("series", hours * 3600)["series"])

    async def api_health(self, request: Request) -> Response:
        console = self.console
        return json_response({**console.feed_state(), "nodes": len(console.fleet.nodes)})

    async def api_openapi(self, request: Request) -> Response:
        return json_response(openapi.document(actions=self.config.actions))

    async def api_stream(self, request: Request) -> Response:
        return await stream(self.console, request)

    async def api_history(self, request: Request) -> Response:
        revision = request.query_params.get("revision") or None
        return json_response(self.console.view("history", revision))

    async def api_node_graph(self, request: Request) -> Response:
        node = request.path_params["node"]
        return json_or_404(views.dependency_view(self.console.fleet, node),
                           f"no node {node!r} in the fleet")

    def _node_param(self, request: Request, app: str) -> str:
        node = request.query_params.get("node", "")
        if not NAME_RE.fullmatch(node):
            raise BadParam(f"?node={node!r}: which node's copy of {app!r} (a node id)")
        return node

    async def api_app_spec(self, request: Request) -> Response:
        """The app's spec as the node runs it and as the node's checkout wants it (the
        node's `state` RPC, env values already `***`), and where they differ."""
        app = request.path_params["app"]
        node = self._node_param(request, app)
        nc = connected_nats(self.console)
        if nc is None:
            return error_response(503, "the console is not connected to NATS")
        reply = await rpc(nc, node, "state", {}, self.config.rpc_timeout)
        if reply.status != 200:
            return json_response({"node": node, "app": app, **reply.body}, reply.status)
        current = (reply.body.get("current") or {}).get(app)
        desired_state = reply.body.get("desired") or {}
        desired = (desired_state.get("apps") or {}).get(app)
        if current is None and desired is None:
            return error_response(404, f"node {node!r} neither runs nor wants an app {app!r}")
        running = current.get("spec") if current else None
        return json_response({
            "node": node, "app": app, "running": running, "desired": desired,
            "desired_revision": desired_state.get("revision"),
            "applied_revision": current.get("applied_revision") if current else None,
            "state": {k: v for k, v in (current or {}).items() if k != "spec"},
            "diff": spec_diff(desired, running),
            "problems": desired_state.get("problems") or [],
        })

    async def api_app_logs(self, request: Request) -> Response:
        """The tail of the app's log on a node (the node's `logs` RPC, bounded). App output
        may hold anything: with tokens configured, a viewer token at least."""
        _actor, refused = authorize(request, self.config, "viewer")
        if refused is not None:
            return refused
        app = request.path_params["app"]
        node = self._node_param(request, app)
        lines = int(float_param(request, "lines", 200, 1, self.config.log_lines_max))
        body: dict[str, Any] = {"app": app, "lines": lines}
        if request.query_params.get("cursor"):
            body["cursor"] = request.query_params["cursor"]
        nc = connected_nats(self.console)
        if nc is None:
            return error_response(503, "the console is not connected to NATS")
        reply = await rpc(nc, node, "logs", body, self.config.rpc_timeout)
        return json_response({"node": node, "app": app, **reply.body}, reply.status)
