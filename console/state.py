"""Shared state of a running console: fleet, feed, change pulse, views memoised per version."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from console import rollout_views, views
from console.config import ConsoleConfig
from console.feed import Feed
from console.fleet import Fleet
from console.history import GitHistory


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

    def forget_views(self) -> None:
        """Drop every memoised view (what they are built from changed outside the fleet)."""
        self._cache.clear()

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
            view = {**views.overview(fleet, now, args[0]),
                    "series": rollout_views.series(fleet, now), "feed": self.feed_state()}
            view["rollouts"] = [{**r, "commit": self.commit_brief(r["revision"])}
                                for r in view["rollouts"]]
            return view
        if kind == "node":
            return views.node_view(fleet, args[0], now)
        if kind == "app":
            return views.app_view(fleet, args[0], now)
        if kind == "rollout":
            return rollout_views.rollout_view(fleet, args[0], now)
        if kind == "events":
            return {"now": now.isoformat(), "events": fleet.event_log(args[0], args[1])}
        if kind == "series":
            return {"series": rollout_views.series(fleet, now, args[0])}
        if kind == "apps":
            return views.apps_view(fleet, now, args[0])
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
