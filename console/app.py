"""The console's Starlette app: pages, API, streams, actions and middleware around a Console."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import nats.errors
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from console.actions import ActionRoutes
from console.config import ConsoleConfig
from console.feed import Connector, Feed
from console.fleet import Fleet
from console.history import GitHistory
from console.node_rpc import connected_nats
from console.routes_api import ApiRoutes
from console.routes_pages import Pages
from console.security import LOOPBACK_HOSTS, SecurityHeaders
from console.state import Console
from console.web import BadParam, bad_param
from reconciler.mesh import subjects

__all__ = ["Console", "ConsoleConfig", "create_app"]

STATIC = Path(__file__).parent / "static"


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

    pages, api = Pages(console), ApiRoutes(console)
    # Order matters where paths overlap: /api/nodes/{node}/forget before the generic
    # /api/nodes/{node}/{action}
    actions = ActionRoutes(console).routes() if config.actions else []
    routes: list[BaseRoute] = [
        *pages.routes(), *actions, *pages.more_routes(), *api.node_rpc_routes(), *api.routes(),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if config.host in LOOPBACK_HOSTS:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS)))
    app = Starlette(
        routes=routes, middleware=middleware, lifespan=lifespan,
        exception_handlers={BadParam: bad_param},  # type: ignore[dict-item]
    )
    app.state.console = console
    return app


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
        console.forget_views()
        console.pulse.fire()
        deadline = time.monotonic() + console.config.history_interval
        while not changed.is_set() and time.monotonic() < deadline:
            nc = connected_nats(console)
            if nc is not None and subscribed_to is not nc:
                async def on_changed(msg: Any) -> None:
                    changed.set()
                with contextlib.suppress(nats.errors.Error):
                    await nc.subscribe(subjects.SOURCE_CHANGED, cb=on_changed)
                    subscribed_to = nc
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)
