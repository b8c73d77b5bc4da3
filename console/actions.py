"""The console's guarded, audited actions: node and fleet RPCs, forget, rollout control."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import nats.js.errors
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console.node_rpc import audit, connected_nats, nats_options, rpc
from console.rollout_views import resolve_revision
from console.security import authorize
from console.state import Console
from console.web import error_response, json_body, json_response
from reconciler.core.rollout import OPERATOR_ACTIONS, RolloutRefused
from reconciler.core.spec import NAME_RE
from reconciler.mesh import subjects
from reconciler.mesh.client import scatter
from reconciler.mesh.rollouts import operate_rollout, rollouts_bucket
from reconciler.mesh.wire import BadRequest, parse_selector

ACTIONS = ("reconcile", "health", "suspend", "resume")


class ActionRoutes:
    """The action routes of one console (only mounted when actions are enabled)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.config = console.config

    def routes(self) -> list[Route]:
        # forget before the generic node action: /api/nodes/{node}/forget is not an RPC
        return [
            Route("/api/nodes/{node}/forget", self.forget, methods=["POST"]),
            Route("/api/fleet/health", self.fleet_health, methods=["POST"]),
            Route("/api/nodes/{node}/{action}", self.node_action, methods=["POST"]),
            Route("/api/fleet/reconcile", self.fleet_action, methods=["POST"]),
            Route("/api/rollouts/{revision}/{action}", self.rollout_action, methods=["POST"]),
        ]

    async def node_action(self, request: Request) -> Response:
        actor, refused = authorize(request, self.config, "operator")
        if refused is not None:
            return refused
        node, action = request.path_params["node"], request.path_params["action"]
        if action not in ACTIONS:
            return error_response(404, f"no action {action!r}; use {', '.join(ACTIONS)}")
        if not NAME_RE.match(node):
            return error_response(400, f"{node!r} is not a valid node id")
        body = await json_body(request)
        payload: dict[str, Any] = {}
        if action != "reconcile" and body.get("app") is not None:
            if not isinstance(body["app"], str) or not NAME_RE.match(body["app"]):
                return error_response(400, "'app' must be an app name")
            payload["app"] = body["app"]
        nc = connected_nats(self.console)
        if nc is None:
            return error_response(503, "the console is not connected to NATS")
        reply = await rpc(nc, node, action, payload, self.config.rpc_timeout)
        await audit(self.console, actor, action, reply.status, node=node, app=payload.get("app"))
        return json_response({"node": node, "action": action, **reply.body}, reply.status)

    async def fleet_action(self, request: Request) -> Response:
        actor, refused = authorize(request, self.config, "operator")
        if refused is not None:
            return refused
        body = await json_body(request)
        payload: dict[str, Any] = {}
        if body.get("selector"):
            # the nodes' own parser: {"match": {...}, "in": ...} or a plain label map
            try:
                payload["selector"] = parse_selector(body["selector"]).model_dump(
                    by_alias=True, exclude_defaults=True)
            except BadRequest as exc:
                return error_response(400, str(exc))
        nc = connected_nats(self.console)
        if nc is None:
            return error_response(503, "the console is not connected to NATS")
        try:
            replies = await scatter(nc, subjects.FLEET_RECONCILE, payload, self.config.fleet_window)
        except nats.errors.Error as exc:  # connection lost mid-request
            return error_response(503, f"NATS: {exc}")
        await audit(self.console, actor, "fleet-reconcile", 200, selector=payload.get("selector"),
                    count=len(replies))
        return json_response({"replies": replies, "count": len(replies)})

    async def rollout_action(self, request: Request) -> Response:
        """pause / resume / abort / promote a coordinated rollout: a CAS on its entry in
        gitops_rollouts (the same as `gitops-mesh rollout ...`), announced once."""
        actor, refused = authorize(request, self.config, "operator")
        if refused is not None:
            return refused
        rev, action = request.path_params["revision"], request.path_params["action"]
        if action not in OPERATOR_ACTIONS:
            return error_response(404, f"no rollout action {action!r}; use "
                                  f"{', '.join(OPERATOR_ACTIONS)}")
        body = await json_body(request)
        reason = body.get("reason") or ""
        if not isinstance(reason, str) or len(reason) > 300:
            return error_response(400, "'reason' must be a string of at most 300 characters")
        full = resolve_revision(self.console.fleet, rev)
        if full is None or full not in self.console.fleet.coordinated:
            return error_response(404, f"no coordinated rollout of {rev!r} (a revision without "
                                  "rollout.yaml applies everywhere at once)")
        nc = connected_nats(self.console)
        if nc is None:
            return error_response(503, "the console is not connected to NATS")
        options = nats_options(self.console)
        js = options.jetstream(nc)
        try:
            kv = await rollouts_bucket(js, create=False)
            if kv is None:
                return error_response(404, f"the {subjects.ROLLOUTS_BUCKET} bucket does not exist")
            result = await operate_rollout(js, kv, options, full, action, reason,
                                           actor="console", now=self.console.clock)
        except RolloutRefused as exc:
            await audit(self.console, actor, f"rollout-{action}", 409, revision=full)
            return error_response(409, str(exc))
        except (TimeoutError, nats.errors.Error) as exc:
            return error_response(503, f"NATS: {exc}")
        assert result.entry is not None
        await audit(self.console, actor, f"rollout-{action}", 200, revision=full,
                    reason=reason or None)
        self.console.fleet.apply_rollout(full, result.entry.to_json_bytes())
        self.console.pulse.fire()
        return json_response({"revision": full, "action": action, "state": result.entry.state,
                              "wave": result.entry.wave,
                              "events": [{"type": e.type, "message": e.message}
                                         for e in result.events]})

    async def forget(self, request: Request) -> Response:
        """Delete a node's status from the bucket (a decommissioned node). A node that is
        still alive puts its status again with its next heartbeat and reappears."""
        actor, refused = authorize(request, self.config, "operator")
        if refused is not None:
            return refused
        node = request.path_params["node"]
        if not NAME_RE.fullmatch(node):
            return error_response(400, f"{node!r} is not a valid node id")
        if node not in self.console.fleet.nodes:
            return error_response(404, f"no node {node!r} in the fleet")
        nc = connected_nats(self.console)
        if nc is None:
            return error_response(503, "the console is not connected to NATS")
        try:
            kv = await nats_options(self.console).jetstream(nc).key_value(subjects.KV_BUCKET)
            await kv.delete(node)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            return error_response(503, f"cannot delete {node!r} from {subjects.KV_BUCKET}: {exc!r}")
        await audit(self.console, actor, "forget", 200, node=node)
        return json_response({"node": node, "action": "forget", "forgotten": True})

    async def fleet_health(self, request: Request) -> Response:
        """RPC `health` (probe now) to each given node, at most rpc_concurrency at once."""
        actor, refused = authorize(request, self.config, "operator")
        if refused is not None:
            return refused
        body = await json_body(request)
        nodes = body.get("nodes")
        if (not isinstance(nodes, list) or not nodes
            or not all(isinstance(n, str) and NAME_RE.fullmatch(n) for n in nodes)):
            return error_response(400, "'nodes' must be a non-empty list of node ids")
        if len(nodes) > self.config.fleet_health_max:
            return error_response(400, f"at most {self.config.fleet_health_max} nodes at once, "
                                  f"got {len(nodes)}")
        nc = connected_nats(self.console)
        if nc is None:
            return error_response(503, "the console is not connected to NATS")
        gate = asyncio.Semaphore(self.config.rpc_concurrency)

        async def ask(node: str) -> dict[str, Any]:
            async with gate:
                reply = await rpc(nc, node, "health", {},
                                  self.config.rpc_timeout)
            if reply.status == 200:
                apps = {k: v for k, v in reply.body.items() if k != "node"}
                unhealthy = sorted(a for a, h in apps.items() if h == "unhealthy")
                return {"node": node, "ok": not unhealthy, "apps": apps,
                        "unhealthy": unhealthy}
            return {"node": node, "ok": False, "error": reply.body.get("error", "error"),
                    "code": reply.status}

        results = await asyncio.gather(*(ask(n) for n in dict.fromkeys(nodes)))
        healthy = sum(r["ok"] for r in results)
        await audit(self.console, actor, "fleet-health", 200, count=len(results),
                    healthy=healthy)
        return json_response({"count": len(results), "healthy": healthy,
                              "unhealthy": len(results) - healthy, "results": results})
