"""Request parsing (query filters, numbers, JSON bodies) and JSON responses of the console."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from console.filters import AppFilter, EventFilter, NodeFilter


class BadParam(ValueError):
    """A query parameter that cannot be served (HTTP 400)."""


async def bad_param(request: Request, exc: BadParam) -> Response:
    return error_response(400, str(exc))


def json_response(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status,
                    media_type="application/json", headers={"Cache-Control": "no-store"})


def error_response(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status, headers={"Cache-Control": "no-store"})


def json_or_404(data: Any, message: str) -> Response:
    return error_response(404, message) if data is None else json_response(data)


def node_query(request: Request) -> NodeFilter | None:
    q = request.query_params
    labels = [v for v in q.getlist("label") if v]
    if not (labels or q.get("layer") or q.get("status")):
        return None
    try:
        return NodeFilter.parse(labels, q.get("layer"), q.get("status"))
    except ValueError as exc:
        raise BadParam(str(exc)) from None


def event_query(request: Request) -> tuple[EventFilter, int]:
    q = request.query_params
    limit = int(float_param(request, "limit", 200, 1, 5000))
    return EventFilter(q.get("node") or None, q.get("app") or None, q.get("type") or None), limit


def float_param(request: Request, name: str, default: float, low: float, high: float) -> float:
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


async def json_body(request: Request) -> dict[str, Any]:
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



def app_query(request: Request) -> AppFilter:
    q = request.query_params
    try:
        return AppFilter.parse(q.get("name"), q.get("layer"), [v for v in q.getlist("label") if v])
    except ValueError as exc:
        raise BadParam(str(exc)) from None
