"""Live streams (server-sent events): views pushed when they change, coalesced, deltas."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from console.state import Console
from console.web import BadParam, app_query, error_response, event_query, node_query

KEEPALIVE_S = 15.0


async def stream(console: Console, request: Request) -> Response:
    """GET /api/stream/{kind}: the live stream of one view (the arguments from the query)."""
    config = console.config
    kind = request.path_params["kind"]
    if kind == "overview":
        args: tuple[Any, ...] = (node_query(request),)
    elif kind in ("node", "app", "rollout"):
        name = request.query_params.get("name", "")
        if not name:
            raise BadParam(f"stream {kind!r} needs ?name=")
        args = (name,)
    elif kind == "events":
        args = event_query(request)
    elif kind == "apps":
        args = (app_query(request),)
    elif kind == "history":
        args = (request.query_params.get("revision") or None,)
    else:
        return error_response(404, f"no stream {kind!r}; use overview, node, app, rollout, "
                              "events, apps, history")
    if console.streams >= config.max_streams:
        return error_response(503, f"too many live streams ({config.max_streams}); "
                              "try again later")
    return StreamingResponse(
        counted(console, live_view(console, kind, args)), media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def live_view(console: Console, kind: str, args: tuple[Any, ...]) -> AsyncIterator[bytes]:
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
                message = overview_delta(view, sent_cards, first=sent is None)
                if message is not None:
                    sent, last_write = view, time.monotonic()
                    yield sse_message(message)
            else:
                # "now" changes every second; push only when the view itself changed
                same = without_now(view)
                if first or same != sent:
                    first, sent, last_write = False, same, time.monotonic()
                    yield sse_message({"full": view})
        await asyncio.sleep(config.push_interval)
        if console.fleet.version == seen_version:
            await console.pulse.wait(max(0.0, next_tick - time.monotonic()))


def without_now(view: Any) -> Any:
    return {k: v for k, v in view.items() if k != "now"} if isinstance(view, dict) else view


async def counted(console: Console, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    console.streams += 1
    try:
        async for chunk in stream:
            yield chunk
    finally:
        console.streams -= 1


def overview_delta(view: dict[str, Any], sent: dict[str, Any], first: bool
                   ) -> dict[str, Any] | None:
    """Only the cards that changed since the last push, plus the small fleet-wide parts.

    `sent` remembers what this browser has: node -> card, and "" -> the fleet-wide parts.
    """
    cards = {c["node"]: c for c in view["nodes"]}
    rest = {k: v for k, v in view.items() if k not in ("nodes", "now", "feed")}
    # cards are memoised per status: the one sent before is mostly the very same dict
    upsert = [c for n, c in cards.items() if (was := sent.get(n)) is not c and was != c]
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


def sse_message(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

