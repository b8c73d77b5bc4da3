"""The console's Starlette app: HTML pages, JSON API, live SSE streams and guarded actions.

Security model (see console/README.md):
- Actions (reconcile, health, suspend/resume, fleet reconcile, rollout pause/resume/abort/
  promote) are POST only and need the
  action token as `Authorization: Bearer <token>` (compared with hmac.compare_digest). The
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
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
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
from console.feed import Connector, Feed, collect, rpc
from console.fleet import EventFilter, Fleet, NodeFilter
from reconciler.core.rollout import OPERATOR_ACTIONS, RolloutRefused
from reconciler.core.spec import NAME_RE
from reconciler.mesh import subjects
from reconciler.mesh.conn import NatsOptions
from reconciler.mesh.rollouts import operate_rollout, rollouts_bucket
from reconciler.mesh.wire import BadRequest, parse_selector

HERE = Path(__file__).parent
CSRF_COOKIE = "gm_csrf"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
ACTIONS = ("reconcile", "health", "suspend", "resume")
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
    stream_check: float = 10.0    # how often to check that the stream/bucket were not re-made
    # Link template for event trace ids, e.g. http://jaeger:16686/trace/{trace_id}
    # (--trace-url / GITOPS_MESH_TRACE_URL); None: trace ids are shown, not linked.
    trace_url: str | None = None

    def check(self) -> None:
        """Refuse unsafe combinations before anything starts."""
        if not self.read_only and not self.insecure and not self.token:
            raise ValueError(
                "actions are enabled but no token is set: pass --token or GITOPS_MESH_TOKEN, "
                "or --read-only (no actions) or --insecure (actions without a token)"
            )
        if self.events_keep < 1:
            raise ValueError("--events-keep must be at least 1")
        if self.trace_url is not None:
            check_trace_url(self.trace_url)

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
    _cache: dict[tuple[Any, ...], Any] = field(default_factory=dict)

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

    def _build(self, kind: str, args: tuple[Any, ...], now: datetime) -> Any:
        fleet = self.fleet
        if kind == "overview":
            return {**fleet.overview(now, args[0]), "series": fleet.series(now),
                    "feed": self.feed_state()}
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
        raise KeyError(kind)

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
        try:
            yield
        finally:
            console.closing = True
            console.pulse.fire()
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

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
        return _json(console.view("overview", _node_query(request)))

    async def api_nodes(request: Request) -> Response:
        return _json(console.fleet.cards(console.clock(), _node_query(request)))

    async def api_node(request: Request) -> Response:
        node = request.path_params["node"]
        return _json_or_404(console.view("node", node), f"no node {node!r} in the fleet")

    async def api_apps(request: Request) -> Response:
        return _json(console.fleet.apps_index())

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
        else:
            return _error(404, f"no stream {kind!r}; use overview, node, app, rollout, events")
        if console.streams >= config.max_streams:
            return _error(503, f"too many live streams ({config.max_streams}); try again later")
        return StreamingResponse(
            _counted(console, _sse(console, kind, args)), media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # ---- actions --------------------------------------------------------------------------

    async def node_action(request: Request) -> Response:
        refused = _refuse(request, config)
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
        reply = await rpc(nc, subjects.rpc_subject(node, action), payload, config.rpc_timeout)
        return _json({"node": node, "action": action, **reply.body}, reply.status)

    async def fleet_action(request: Request) -> Response:
        refused = _refuse(request, config)
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
            replies = await collect(nc, subjects.FLEET_RECONCILE, payload, config.fleet_window)
        except nats.errors.Error as exc:  # connection lost mid-request
            return _error(503, f"NATS: {exc}")
        return _json({"replies": replies, "count": len(replies)})

    async def rollout_action(request: Request) -> Response:
        """pause / resume / abort / promote a coordinated rollout: a CAS on its entry in
        gitops_rollouts (the same as `gitops-mesh rollout ...`), announced once."""
        refused = _refuse(request, config)
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
            return _error(409, str(exc))
        except (TimeoutError, nats.errors.Error) as exc:
            return _error(503, f"NATS: {exc}")
        assert result.entry is not None
        console.fleet.apply_rollout(full, result.entry.to_json_bytes())
        console.pulse.fire()
        return _json({"revision": full, "action": action, "state": result.entry.state,
                      "wave": result.entry.wave,
                      "events": [{"type": e.type, "message": e.message}
                                 for e in result.events]})

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
    if config.actions:
        routes[5:5] = [
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


def _nats(console: Console) -> Any:
    feed = console.feed
    return feed.nc if feed is not None and feed.connected else None


def _from_browser(request: Request) -> bool:
    h = request.headers
    return bool(h.get("origin") or h.get("sec-fetch-site") or h.get("cookie"))


def _refuse(request: Request, config: ConsoleConfig) -> Response | None:
    """None when the action may proceed; otherwise the 401/403 response saying why."""
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
    if config.insecure:
        return None
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return _error(401, "action token required (Authorization: Bearer <token>)")
    assert config.token is not None
    if not hmac.compare_digest(given.strip().encode(), config.token.encode()):
        return _error(403, "wrong action token")
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
