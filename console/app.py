"""The console's Starlette app: HTML pages, JSON API, live SSE streams and guarded actions.

Security model (see console/README.md):
- Actions (reconcile, health, suspend/resume, fleet reconcile and health, forget, rollout
  pause/resume/abort/promote) are POST
  only and need an operator token as `Authorization: Bearer <token>` (the single --token, or
  an `operator` entry of --tokens; compared with hmac.compare_digest). Viewer tokens may read
  app logs and are refused actions (403). Every action is recorded in an audit event
  `gitops.events.console.action.<action>` naming the token that acted. The
  browser keeps the token the user typed in sessionStorage, never in a cookie, so a forged
  cross-site request cannot carry it.
- Requests that come from a browser (Origin, Sec-Fetch-Site or Cookie header present) must
  also be same-origin and carry the double-submit CSRF token (`X-CSRF-Token` equal to the
  `gm_csrf` cookie, which the page embeds). With --insecure (no token) that is always required.
- On a loopback bind only loopback Host names are served (DNS-rebinding defence).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from console import openapi
from console.feed import Connector, Feed
from console.fleet import AppFilter, EventFilter, Fleet, NodeFilter, spec_diff
from console.history import GitHistory
from console.tokens import Actor, Role, Token, identify
from reconciler.core.events import Event, iso_time, new_event_id
from reconciler.core.rollout import OPERATOR_ACTIONS, RolloutRefused
from reconciler.core.spec import NAME_RE
from reconciler.mesh import subjects
from reconciler.mesh.client import RpcError, call, scatter
from reconciler.mesh.conn import NatsOptions
from reconciler.mesh.rollouts import operate_rollout, rollouts_bucket
from reconciler.mesh.wire import BadRequest, parse_selector

HERE = Path(__file__).parent
log = logging.getLogger("gitops_mesh.console")
CSRF_COOKIE = "gm_csrf"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
ACTIONS = ("reconcile", "health", "suspend", "resume")
SINGLE_TOKEN_NAME = "token"  # the audit name of the single --token
AUDIT_NODE = "console"       # audit events: gitops.events.console.action.<action>
KEEPALIVE_S = 15.0
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


@dataclass
class ConsoleConfig:
    token: str | None = None
    read_only: bool = False
    insecure: bool = False
    events_keep: int = 5000
    host: str = "127.0.0.1"
    push_interval: float = 0.25   # coalescing: at most one push per stream per interval
    tick: float = 2.0             # re-check clock-derived state (unreachable) this often
    rpc_timeout: float = 5.0
    max_streams: int = 500        # concurrent live streams (browser tabs) served at once
    fleet_window: float = 1.0     # how long fleet reconcile collects replies
    replay_s: float = 3600.0
    stream_check: float = 2.0     # how often to check stream, bucket, consumer (failover)
    # Link template for event trace ids, e.g. http://jaeger:16686/trace/{trace_id}
    # (--trace-url / GITOPS_MESH_TRACE_URL); None: trace ids are shown, not linked.
    trace_url: str | None = None
    # named tokens with roles (--tokens FILE); `token` above is an operator named "token"
    tokens: tuple[Token, ...] = ()
    # revision history: a read-only bare cache clone of the spec repo (--repo, --branch)
    repo: str | None = None
    branch: str | None = None
    history_interval: float = 60.0   # refresh this often (and on gitops.source.changed)
    git_timeout: float = 30.0
    fleet_health_max: int = 5000     # nodes one fleet health check may ask
    rpc_concurrency: int = 64        # RPCs in flight for one fleet health check
    log_lines_max: int = 1000

    def all_tokens(self) -> tuple[Token, ...]:
        single = (Token(SINGLE_TOKEN_NAME, self.token, "operator"),) if self.token else ()
        return (*single, *self.tokens)

    def check(self) -> None:
        """Refuse unsafe combinations before anything starts."""
        operators = [t for t in self.all_tokens() if t.role == "operator"]
        if not self.read_only and not self.insecure and not operators:
            raise ValueError(
                "actions are enabled but no token is set: pass --token or GITOPS_MESH_TOKEN "
                "(or an operator in --tokens FILE), or --read-only (no actions) or "
                "--insecure (actions without a token)"
            )
        if self.events_keep < 1:
            raise ValueError("--events-keep must be at least 1")
        if self.trace_url is not None:
            check_trace_url(self.trace_url)
        if self.repo:
            GitHistory(self.repo, self.branch)  # refuses a bad --repo or --branch

    @property
    def actions(self) -> bool:
        return not self.read_only


def check_trace_url(template: str) -> None:
    """A --trace-url template must be an http(s) URL with one `{trace_id}` placeholder
    (anything else, e.g. `javascript:`, would put a script link into every event row)."""
    if not template.startswith(("http://", "https://")):
        raise ValueError(f"--trace-url {template!r}: expected an http:// or https:// URL")
    if template.count("{trace_id}") != 1:
        raise ValueError(f"--trace-url {template!r}: expected one {{trace_id}} placeholder, "
                         "e.g. http://jaeger:16686/trace/{trace_id}")


class Pulse:
    """Wakes every waiter once per change burst; cheap to fire thousands of times a second."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def fire(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def wait(self, timeout: float) -> None:
        if self._future is None or self._future.done():
            self._future = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._future), timeout)


@dataclass
class Console:
    """Shared state of one running console."""

    config: ConsoleConfig
    fleet: Fleet
    feed: Feed | None = None
    pulse: Pulse = field(default_factory=Pulse)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    closing: bool = False
    streams: int = 0
    loop: asyncio.AbstractEventLoop | None = None
    history: GitHistory | None = None
    _cache: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    # (kind, args) -> (the view, its JSON): a view is serialised once, however many ask
    _json_cache: dict[tuple[Any, ...], tuple[Any, bytes]] = field(default_factory=dict)

    def view(self, kind: str, *args: Any) -> Any:
        """A fleet view, memoised per fleet version and second (many browsers, one build)."""
        return self.view_at(kind, *args)[1]

    def view_at(self, kind: str, *args: Any, max_age: float = 0.0) -> tuple[int, Any]:
        """(fleet version it was built from, view).

        `max_age` > 0 also accepts a build that old even if the fleet changed since: live
        streams use it, so under a constant stream of events a view is built at most once
        per push interval however many browsers watch it. Only the newest build per view
        is kept, so memory stays bounded under load.
        """
        now = self.clock()
        stamp = (self.fleet.version, int(now.timestamp()))
        hit = self._cache.get((kind, args))
        if hit is not None and (hit[0] == stamp or time.monotonic() - hit[1] < max_age):
            return hit[0][0], hit[2]
        value = self._build(kind, args, now)
        if len(self._cache) >= 64:
            self._cache.clear()
        self._cache[(kind, args)] = (stamp, time.monotonic(), value)
        return stamp[0], value

    def view_json(self, kind: str, *args: Any) -> bytes:
        """The JSON of view(kind, *args), serialised once per build of the view (the
        overview of 5,000 nodes is megabytes: dumping it is most of a request)."""
        value = self.view(kind, *args)
        key = (kind, args)
        hit = self._json_cache.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        data = json.dumps(value, separators=(",", ":")).encode()
        if len(self._json_cache) >= 64:
            self._json_cache.clear()
        self._json_cache[key] = (value, data)
        return data

    def _build(self, kind: str, args: tuple[Any, ...], now: datetime) -> Any:
        fleet = self.fleet
        if kind == "overview":
            view = {**fleet.overview(now, args[0]), "series": fleet.series(now),
                    "feed": self.feed_state()}
            view["rollouts"] = [{**r, "commit": self.commit_brief(r["revision"])}
                                for r in view["rollouts"]]
            return view
        if kind == "node":
            return fleet.node_view(args[0], now)
        if kind == "app":
            return fleet.app_view(args[0], now)
        if kind == "rollout":
            return fleet.rollout_view(args[0], now)
        if kind == "events":
            return {"now": now.isoformat(), "events": fleet.event_log(args[0], args[1])}
        if kind == "series":
            return {"series": fleet.series(now, args[0])}
        if kind == "apps":
            return fleet.apps_view(now, args[0])
        if kind == "history":
            return self.history_view(args[0])
        raise KeyError(kind)

    def commit_brief(self, revision: str) -> dict[str, Any] | None:
        """Subject, author and time of a revision's commit, if the history knows it."""
        commit = self.history.commit(revision) if self.history else None
        if commit is None:
            return None
        return {k: commit[k] for k in ("subject", "author", "time", "apps")}

    def history_view(self, revision: str | None) -> dict[str, Any]:
        if self.history is None:
            return {"enabled": False, "commits": [], "selected": None, "error": None,
                    "repo": None, "branch": None, "refreshed_at": None}
        view = self.history.view(revision)
        # which of the commits the fleet runs: nodes per revision, from the statuses
        running: dict[str, int] = {}
        for status in self.fleet.nodes.values():
            if status.revision:
                running[status.revision] = running.get(status.revision, 0) + 1
        view["commits"] = [{**c, "nodes": running.get(c["revision"], 0)}
                           for c in view["commits"]]
        return {"enabled": True, **view}

    def close_streams(self) -> None:
        """End every live stream (thread-safe): a server shutting down should not wait
        for browser tabs to go away."""
        self.closing = True
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.pulse.fire)

    def feed_state(self) -> dict[str, Any]:
        feed = self.feed
        return {
            "state": feed.state if feed else "off",
            "connected": bool(feed and feed.connected),
            "error": feed.last_error if feed else None,
            # the stream or bucket differs from what nats-init documents (page banner too)
            "mismatch": feed.mismatch if feed else None,
            "last_seq": feed.last_seq if feed else 0,
            "events_total": self.fleet.events_total,
            "rejected": self.fleet.rejected,
            "forged": self.fleet.forged,
            "streams": self.streams,
        }


def create_app(
    config: ConsoleConfig,
    connect: Connector | None,
    *,
    fleet: Fleet | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Starlette:
    """The ASGI app; `connect` opens the NATS connection (None: no feed, for page tests)."""
    config.check()
    console = Console(config, fleet or Fleet(events_keep=config.events_keep))
    if clock is not None:
        console.clock = clock
    if config.repo:
        console.history = GitHistory(config.repo, config.branch, timeout=config.git_timeout)
    templates = Jinja2Templates(directory=str(HERE / "templates"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        console.loop = asyncio.get_running_loop()
        task = None
        if connect is not None:
            console.feed = Feed(console.fleet, connect, on_change=console.pulse.fire,
                                replay_s=config.replay_s, check_interval=config.stream_check,
                                clock=console.clock)
            task = asyncio.create_task(console.feed.run(), name="console-feed")
        history_task = (asyncio.create_task(follow_history(console), name="console-history")
                        if console.history is not None else None)
        try:
            yield
        finally:
            console.closing = True
            console.pulse.fire()
            for running in (task, history_task):
                if running is not None:
                    running.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await running
            if console.history is not None:
                console.history.close()

    # ---- pages ----------------------------------------------------------------------

    def page(request: Request, template: str, kind: str, data: Any, **extra: Any) -> Response:
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        response = templates.TemplateResponse(request, template, {
            "kind": kind, "data": data, "csrf": csrf, "actions": config.actions,
            "insecure": config.insecure, "trace_url": config.trace_url, **extra,
        })
        response.set_cookie(CSRF_COOKIE, csrf, httponly=False, samesite="strict", path="/")
        return response

    async def overview_page(request: Request) -> Response:
        return page(request, "overview.html", "overview", console.view("overview", None),
                    title="Fleet")

    async def node_page(request: Request) -> Response:
        node = request.path_params["node"]
        return page(request, "node.html", "node", console.view("node", node), title=node,
                    name=node)

    async def app_page(request: Request) -> Response:
        name = request.path_params["app"]
        return page(request, "app.html", "app", console.view("app", name), title=name,
                    name=name)

    async def rollout_page(request: Request) -> Response:
        rev = request.path_params["revision"]
        return page(request, "rollout.html", "rollout", console.view("rollout", rev),
                    title=f"rollout {rev[:12]}", name=rev)

    async def events_page(request: Request) -> Response:
        where, limit = _event_query(request)
        return page(request, "events.html", "events", console.view("events", where, limit),
                    title="Events", filters={"node": where.node or "", "app": where.app or "",
                                             "type": where.type or ""})

    # ---- JSON API ---------------------------------------------------------------------

    async def api_fleet(request: Request) -> Response:
        return Response(console.view_json("overview", _node_query(request)),
                        media_type="application/json", headers={"Cache-Control": "no-store"})

    async def api_nodes(request: Request) -> Response:
        return _json(console.fleet.cards(console.clock(), _node_query(request)))

    async def api_node(request: Request) -> Response:
        node = request.path_params["node"]
        return _json_or_404(console.view("node", node), f"no node {node!r} in the fleet")

    async def api_apps(request: Request) -> Response:
        return _json(console.fleet.apps_index(_app_query(request)))

    async def api_app(request: Request) -> Response:
        name = request.path_params["app"]
        return _json_or_404(console.view("app", name), f"no app {name!r} on any node")

    async def api_rollout(request: Request) -> Response:
        rev = request.path_params["revision"]
        return _json_or_404(console.view("rollout", rev),
                            f"revision {rev!r} is not known (or the prefix is ambiguous)")

    async def api_events(request: Request) -> Response:
        where, limit = _event_query(request)
        return _json(console.view("events", where, limit)["events"])

    async def api_series(request: Request) -> Response:
        hours = _float_param(request, "hours", 6.0, 0.01, 24 * 7)
        return _json(console.view("series", hours * 3600)["series"])

    async def api_health(request: Request) -> Response:
        return _json({**console.feed_state(), "nodes": len(console.fleet.nodes)})

    async def api_openapi(request: Request) -> Response:
        return _json(openapi.document(actions=config.actions))

    # ---- live streams (server-sent events) ------------------------------------------------

    async def stream(request: Request) -> Response:
        kind = request.path_params["kind"]
        if kind == "overview":
            args: tuple[Any, ...] = (_node_query(request),)
        elif kind in ("node", "app", "rollout"):
            name = request.query_params.get("name", "")
            if not name:
                raise BadParam(f"stream {kind!r} needs ?name=")
            args = (name,)
        elif kind == "events":
            args = _event_query(request)
        elif kind == "apps":
            args = (_app_query(request),)
        elif kind == "history":
            args = (request.query_params.get("revision") or None,)
        else:
            return _error(404, f"no stream {kind!r}; use overview, node, app, rollout, events, "
                               "apps, history")
        if console.streams >= config.max_streams:
            return _error(503, f"too many live streams ({config.max_streams}); try again later")
        return StreamingResponse(
            _counted(console, _sse(console, kind, args)), media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # ---- actions --------------------------------------------------------------------------

    async def node_action(request: Request) -> Response:
        actor, refused = _authorize(request, config, "operator")
        if refused is not None:
            return refused
        node, action = request.path_params["node"], request.path_params["action"]
        if action not in ACTIONS:
            return _error(404, f"no action {action!r}; use {', '.join(ACTIONS)}")
        if not NAME_RE.match(node):
            return _error(400, f"{node!r} is not a valid node id")
        body = await _json_body(request)
        payload: dict[str, Any] = {}
        if action != "reconcile" and body.get("app") is not None:
            if not isinstance(body["app"], str) or not NAME_RE.match(body["app"]):
                return _error(400, "'app' must be an app name")
            payload["app"] = body["app"]
        nc = _nats(console)
        if nc is None:
            return _error(503, "the console is not connected to NATS")
        reply = await rpc(nc, node, action, payload, config.rpc_timeout)
        await audit(console, actor, action, reply.status, node=node, app=payload.get("app"))
        return _json({"node": node, "action": action, **reply.body}, reply.status)

    async def fleet_action(request: Request) -> Response:
        actor, refused = _authorize(request, config, "operator")
        if refused is not None:
            return refused
        body = await _json_body(request)
        payload: dict[str, Any] = {}
        if body.get("selector"):
            # the nodes' own parser: {"match": {...}, "in": ...} or a plain label map
            try:
                payload["selector"] = parse_selector(body["selector"]).model_dump(
                    by_alias=True, exclude_defaults=True)
            except BadRequest as exc:
                return _error(400, str(exc))
        nc = _nats(console)
        if nc is None:
            return _error(503, "the console is not connected to NATS")
        try:
            replies = await scatter(nc, subjects.FLEET_RECONCILE, payload, config.fleet_window)
        except nats.errors.Error as exc:  # connection lost mid-request
            return _error(503, f"NATS: {exc}")
        await audit(console, actor, "fleet-reconcile", 200, selector=payload.get("selector"),
                    count=len(replies))
        return _json({"replies": replies, "count": len(replies)})

    async def rollout_action(request: Request) -> Response:
        """pause / resume / abort / promote a coordinated rollout: a CAS on its entry in
        gitops_rollouts (the same as `gitops-mesh rollout ...`), announced once."""
        actor, refused = _authorize(request, config, "operator")
        if refused is not None:
            return refused
        rev, action = request.path_params["revision"], request.path_params["action"]
        if action not in OPERATOR_ACTIONS:
            return _error(404, f"no rollout action {action!r}; use "
                               f"{', '.join(OPERATOR_ACTIONS)}")
        body = await _json_body(request)
        reason = body.get("reason") or ""
        if not isinstance(reason, str) or len(reason) > 300:
            return _error(400, "'reason' must be a string of at most 300 characters")
        full = console.fleet.resolve_revision(rev)
        if full is None or full not in console.fleet.coordinated:
            return _error(404, f"no coordinated rollout of {rev!r} (a revision without "
                               "rollout.yaml applies everywhere at once)")
        nc = _nats(console)
        if nc is None:
            return _error(503, "the console is not connected to NATS")
        feed = console.feed
        assert feed is not None
        options = NatsOptions(js_domain=feed.js_domain)
        js = options.jetstream(nc)
        try:
            kv = await rollouts_bucket(js, create=False)
            if kv is None:
                return _error(404, f"the {subjects.ROLLOUTS_BUCKET} bucket does not exist")
            result = await operate_rollout(js, kv, options, full, action, reason,
                                           actor="console", now=console.clock)
        except RolloutRefused as exc:
            await audit(console, actor, f"rollout-{action}", 409, revision=full)
            return _error(409, str(exc))
        except (TimeoutError, nats.errors.Error) as exc:
            return _error(503, f"NATS: {exc}")
        assert result.entry is not None
        await audit(console, actor, f"rollout-{action}", 200, revision=full,
                    reason=reason or None)
        console.fleet.apply_rollout(full, result.entry.to_json_bytes())
        console.pulse.fire()
        return _json({"revision": full, "action": action, "state": result.entry.state,
                      "wave": result.entry.wave,
                      "events": [{"type": e.type, "message": e.message}
                                 for e in result.events]})
    ops = OpsRoutes(console)

    routes = [
        Route("/", overview_page),
        Route("/nodes/{node}", node_page),
        Route("/apps/{app}", app_page),
        Route("/rollouts/{revision}", rollout_page),
        Route("/events", events_page),
        Route("/api/fleet", api_fleet),
        Route("/api/nodes", api_nodes),
        Route("/api/nodes/{node}", api_node),
        Route("/api/apps", api_apps),
        Route("/api/apps/{app}", api_app),
        Route("/api/rollouts/{revision}", api_rollout),
        Route("/api/events", api_events),
        Route("/api/series", api_series),
        Route("/api/health", api_health),
        Route("/api/openapi.json", api_openapi),
        Route("/api/stream/{kind}", stream),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    routes[5:5] = ops.read_routes()
    if config.actions:
        routes[5:5] = [
            *ops.action_routes(),
            Route("/api/nodes/{node}/{action}", node_action, methods=["POST"]),
            Route("/api/fleet/reconcile", fleet_action, methods=["POST"]),
            Route("/api/rollouts/{revision}/{action}", rollout_action, methods=["POST"]),
        ]
    middleware = [Middleware(SecurityHeaders)]
    if config.host in LOOPBACK_HOSTS:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS)))
    app = Starlette(
        routes=routes, middleware=middleware, lifespan=lifespan,
        exception_handlers={BadParam: _bad_param},  # type: ignore[dict-item]
    )
    app.state.console = console
    app.state.page = page

    return app


class SecurityHeaders:
    """Adds CSP and friends to every response (pure ASGI: does not buffer SSE streams)."""

    HEADERS = (
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"x-frame-options", b"DENY"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BadParam(ValueError):
    """A query parameter that cannot be served (HTTP 400)."""


async def _bad_param(request: Request, exc: BadParam) -> Response:
    return _error(400, str(exc))


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status,
                    media_type="application/json", headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status, headers={"Cache-Control": "no-store"})


def _json_or_404(data: Any, message: str) -> Response:
    return _error(404, message) if data is None else _json(data)


def _node_query(request: Request) -> NodeFilter | None:
    q = request.query_params
    labels = [v for v in q.getlist("label") if v]
    if not (labels or q.get("layer") or q.get("status")):
        return None
    try:
        return NodeFilter.parse(labels, q.get("layer"), q.get("status"))
    except ValueError as exc:
        raise BadParam(str(exc)) from None


def _event_query(request: Request) -> tuple[EventFilter, int]:
    q = request.query_params
    limit = int(_float_param(request, "limit", 200, 1, 5000))
    return EventFilter(q.get("node") or None, q.get("app") or None, q.get("type") or None), limit


def _float_param(request: Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadParam(f"?{name}={raw!r}: expected a number") from None
    if not low <= value <= high:
        raise BadParam(f"?{name}={raw}: expected {low:g}..{high:g}")
    return value


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadParam("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadParam("the request body must be a JSON object")
    return body


@dataclass
class RpcReply:
    """HTTP-ready outcome of a node RPC: status code and JSON body."""

    status: int
    body: dict[str, Any]


async def rpc(nc: Any, node: str, endpoint: str, payload: dict[str, Any], timeout: float
              ) -> RpcReply:
    """One node RPC (reconciler.mesh.client.call) as an HTTP answer; failures are values:
    the node's own 4xx pass through, silence is 503/504, its failures a 502."""
    try:
        answer = await call(nc, node, endpoint, payload, timeout)
    except RpcError as exc:
        code = int(exc.code) if exc.code and exc.code.isdigit() else None
        return RpcReply(exc.status, {"error": exc.detail, "code": code})
    return RpcReply(200, answer if isinstance(answer, dict) else {"result": answer})


def _nats(console: Console) -> Any:
    feed = console.feed
    return feed.nc if feed is not None and feed.connected else None


def _from_browser(request: Request) -> bool:
    h = request.headers
    return bool(h.get("origin") or h.get("sec-fetch-site") or h.get("cookie"))


def _authorize(request: Request, config: ConsoleConfig, need: Role
               ) -> tuple[Actor, None] | tuple[None, Response]:
    """(who, None) when the request may proceed; otherwise (None, the 401/403 saying why).
    Actions (`need` operator, POST) from a browser must also pass the CSRF checks."""
    if need == "operator":
        refused = _refuse_cross_site(request, config)
        if refused is not None:
            return None, refused
    if config.insecure:
        return Actor("anonymous", "operator"), None
    tokens = config.all_tokens()
    if not tokens:  # --read-only without tokens: what may be read is open
        if need == "viewer":
            return Actor("anonymous", "viewer"), None
        return None, _error(403, "this console has no operator token")
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    what = "action token" if need == "operator" else "token"
    if scheme.lower() != "bearer" or not given.strip():
        return None, _error(401, f"{what} required (Authorization: Bearer <token>)")
    actor = identify(given.strip(), tokens)
    if actor is None:
        return None, _error(403, f"wrong {what}")
    if not actor.may(need):
        return None, _error(403, f"token {actor.name!r} is a {actor.role}: this needs an "
                                 f"{need} token")
    return actor, None


def _refuse_cross_site(request: Request, config: ConsoleConfig) -> Response | None:
    """None when the request is not a forged cross-site one; otherwise the 403."""
    if config.insecure or _from_browser(request):
        site = request.headers.get("sec-fetch-site")
        if site and site not in ("same-origin", "none"):
            return _error(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin and origin.split("://", 1)[-1] != host:
            return _error(403, f"cross-origin request refused (Origin: {origin})")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        sent = request.headers.get("x-csrf-token", "")
        if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
            return _error(403, "missing or wrong CSRF token: reload the page and try again")
    return None


async def _sse(console: Console, kind: str, args: tuple[Any, ...]) -> AsyncIterator[bytes]:
    """Push the view whenever it changes, at most once per push_interval (coalesced)."""
    config = console.config
    sent: Any = None
    first = True
    sent_cards: dict[str, Any] = {}
    seen_version = -1
    next_tick = 0.0
    last_write = time.monotonic()
    yield b"retry: 1000\n\n"
    while not console.closing:
        if time.monotonic() - last_write > KEEPALIVE_S:
            # a comment line: keeps idle proxies and load balancers from closing the stream
            last_write = time.monotonic()
            yield b": keepalive\n\n"
        if console.fleet.version != seen_version or time.monotonic() >= next_tick:
            next_tick = time.monotonic() + config.tick
            # a shared build up to one push interval old; if the fleet moved on since,
            # the next round (one interval later) pushes the newer state
            seen_version, view = console.view_at(kind, *args, max_age=config.push_interval)
            if kind == "overview":
                message = _overview_delta(view, sent_cards, first=sent is None)
                if message is not None:
                    sent, last_write = view, time.monotonic()
                    yield _sse_message(message)
            else:
                # "now" changes every second; push only when the view itself changed
                same = _without_now(view)
                if first or same != sent:
                    first, sent, last_write = False, same, time.monotonic()
                    yield _sse_message({"full": view})
        await asyncio.sleep(config.push_interval)
        if console.fleet.version == seen_version:
            await console.pulse.wait(max(0.0, next_tick - time.monotonic()))


def _without_now(view: Any) -> Any:
    return {k: v for k, v in view.items() if k != "now"} if isinstance(view, dict) else view


async def _counted(console: Console, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    console.streams += 1
    try:
        async for chunk in stream:
            yield chunk
    finally:
        console.streams -= 1


def _overview_delta(view: dict[str, Any], sent: dict[str, Any], first: bool
                    ) -> dict[str, Any] | None:
    """Only the cards that changed since the last push, plus the small fleet-wide parts.

    `sent` remembers what this browser has: node -> card, and "" -> the fleet-wide parts.
    """
    cards = {c["node"]: c for c in view["nodes"]}
    rest = {k: v for k, v in view.items() if k not in ("nodes", "now", "feed")}
    upsert = [c for n, c in cards.items() if sent.get(n) != c]
    remove = [n for n in sent if n and n not in cards]
    if not first and not upsert and not remove and sent.get("") == rest:
        return None
    sent.clear()
    sent.update(cards)
    sent[""] = rest
    if first:
        return {"full": view}
    return {"delta": {**rest, "now": view["now"], "feed": view["feed"], "upsert": upsert,
                      "remove": remove}}


def _sse_message(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


# ---- operations of issue #12: apps, specs, logs, dependency graph, history, fleet health,
# forget, audit. Routes are added by create_app from OpsRoutes.


class OpsRoutes:
    """Read routes (apps page, spec and log of an app on a node, dependency graph, history)
    and operator actions (fleet health check, forget a node) of one console."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.config = console.config

    def read_routes(self) -> list[Route]:
        return [
            Route("/apps", self.apps_page),
            Route("/history", self.history_page),
            Route("/api/apps/{app}/spec", self.api_app_spec),
            Route("/api/apps/{app}/logs", self.api_app_logs),
            Route("/api/nodes/{node}/graph", self.api_node_graph),
            Route("/api/history", self.api_history),
        ]

    def action_routes(self) -> list[Route]:
        return [
            Route("/api/nodes/{node}/forget", self.forget, methods=["POST"]),
            Route("/api/fleet/health", self.fleet_health, methods=["POST"]),
        ]

    # ---- reads ---------------------------------------------------------------------------

    async def apps_page(self, request: Request) -> Response:
        where = _app_query(request)
        page = request.app.state.page
        return page(request, "apps.html", "apps", self.console.view("apps", where),
                    title="Apps", filters={"name": where.name or "", "layer": where.layer or "",
                                           "label": "=".join(where.labels[0])
                                           if where.labels else ""})

    async def history_page(self, request: Request) -> Response:
        revision = request.query_params.get("revision") or None
        page = request.app.state.page
        return page(request, "history.html", "history", self.console.view("history", revision),
                    title="History", name=revision or "")

    async def api_history(self, request: Request) -> Response:
        return _json(self.console.view("history", request.query_params.get("revision") or None))

    async def api_node_graph(self, request: Request) -> Response:
        node = request.path_params["node"]
        return _json_or_404(self.console.fleet.dependency_view(node),
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
        nc = _nats(self.console)
        if nc is None:
            return _error(503, "the console is not connected to NATS")
        reply = await rpc(nc, node, "state", {}, self.config.rpc_timeout)
        if reply.status != 200:
            return _json({"node": node, "app": app, **reply.body}, reply.status)
        current = (reply.body.get("current") or {}).get(app)
        desired_state = reply.body.get("desired") or {}
        desired = (desired_state.get("apps") or {}).get(app)
        if current is None and desired is None:
            return _error(404, f"node {node!r} neither runs nor wants an app {app!r}")
        running = current.get("spec") if current else None
        return _json({
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
        _actor, refused = _authorize(request, self.config, "viewer")
        if refused is not None:
            return refused
        app = request.path_params["app"]
        node = self._node_param(request, app)
        lines = int(_float_param(request, "lines", 200, 1, self.config.log_lines_max))
        body: dict[str, Any] = {"app": app, "lines": lines}
        if request.query_params.get("cursor"):
            body["cursor"] = request.query_params["cursor"]
        nc = _nats(self.console)
        if nc is None:
            return _error(503, "the console is not connected to NATS")
        reply = await rpc(nc, node, "logs", body, self.config.rpc_timeout)
        return _json({"node": node, "app": app, **reply.body}, reply.status)

    # ---- actions -------------------------------------------------------------------------

    async def forget(self, request: Request) -> Response:
        """Delete a node's status from the bucket (a decommissioned node). A node that is
        still alive puts its status again with its next heartbeat and reappears."""
        actor, refused = _authorize(request, self.config, "operator")
        if refused is not None:
            return refused
        node = request.path_params["node"]
        if not NAME_RE.fullmatch(node):
            return _error(400, f"{node!r} is not a valid node id")
        if node not in self.console.fleet.nodes:
            return _error(404, f"no node {node!r} in the fleet")
        nc = _nats(self.console)
        if nc is None:
            return _error(503, "the console is not connected to NATS")
        try:
            kv = await self._js(nc).key_value(subjects.KV_BUCKET)
            await kv.delete(node)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            return _error(503, f"cannot delete {node!r} from {subjects.KV_BUCKET}: {exc!r}")
        await audit(self.console, actor, "forget", 200, node=node)
        return _json({"node": node, "action": "forget", "forgotten": True})

    async def fleet_health(self, request: Request) -> Response:
        """RPC `health` (probe now) to each given node, at most rpc_concurrency at once."""
        actor, refused = _authorize(request, self.config, "operator")
        if refused is not None:
            return refused
        body = await _json_body(request)
        nodes = body.get("nodes")
        if (not isinstance(nodes, list) or not nodes
                or not all(isinstance(n, str) and NAME_RE.fullmatch(n) for n in nodes)):
            return _error(400, "'nodes' must be a non-empty list of node ids")
        if len(nodes) > self.config.fleet_health_max:
            return _error(400, f"at most {self.config.fleet_health_max} nodes at once, "
                               f"got {len(nodes)}")
        nc = _nats(self.console)
        if nc is None:
            return _error(503, "the console is not connected to NATS")
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
        return _json({"count": len(results), "healthy": healthy,
                      "unhealthy": len(results) - healthy, "results": results})

    def _js(self, nc: Any) -> Any:
        domain = self.console.feed.js_domain if self.console.feed else None
        return nc.jetstream(domain=domain) if domain else nc.jetstream()


async def audit(console: Console, actor: Actor | None, action: str, status: int,
                **target: Any) -> None:
    """Publish `gitops.events.console.action.<action>` naming who did what to which target
    and how it went. A lost audit event is logged; the action already happened."""
    nc = _nats(console)
    who = actor or Actor("unknown", "viewer")
    target = {k: v for k, v in target.items() if v is not None}
    what = " ".join(f"{k}={v}" for k, v in target.items() if k in ("node", "app", "count"))
    event = Event(
        id=new_event_id(), type=f"action.{action}", node=AUDIT_NODE,
        time=iso_time(console.clock()), app=target.get("app"),
        outcome="success" if status < 400 else "failure",
        message=f"{who.name} ({who.role}): {action} {what} -> {status}".replace("  ", " "),
        data={"actor": who.name, "role": who.role, "action": action, "status": status,
              **target},
    )
    if nc is None:
        log.warning("audit event not published (NATS away): %s", event.message)
        return
    js = nc.jetstream(domain=console.feed.js_domain) if (
        console.feed and console.feed.js_domain) else nc.jetstream()
    try:
        await js.publish(event.subject, event.to_json_bytes(),
                         headers={"Nats-Msg-Id": event.id}, timeout=2.0)
    except Exception as exc:  # no stream, no permission, timeout
        log.warning("audit event not published (%r): %s", exc, event.message)


async def follow_history(console: Console) -> None:
    """Refresh the revision history now, every history_interval, and on every
    gitops.source.changed (a push hook's notice), in a thread: git may take a while."""
    history = console.history
    assert history is not None
    changed = asyncio.Event()
    subscribed_to: Any = None
    while not console.closing:
        changed.clear()
        await asyncio.to_thread(history.refresh)
        console._cache.clear()
        console.pulse.fire()
        deadline = time.monotonic() + console.config.history_interval
        while not changed.is_set() and time.monotonic() < deadline:
            nc = _nats(console)
            if nc is not None and subscribed_to is not nc:
                async def on_changed(msg: Any) -> None:
                    changed.set()
                with contextlib.suppress(nats.errors.Error):
                    await nc.subscribe(subjects.SOURCE_CHANGED, cb=on_changed)
                    subscribed_to = nc
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)


def _app_query(request: Request) -> AppFilter:
    q = request.query_params
    try:
        return AppFilter.parse(q.get("name"), q.get("layer"), [v for v in q.getlist("label") if v])
    except ValueError as exc:
        raise BadParam(str(exc)) from None
