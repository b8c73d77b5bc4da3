"""The console's HTML pages: each renders its view into a template with the CSRF cookie set."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from console.security import CSRF_COOKIE
from console.state import Console
from console.web import app_query, event_query

TEMPLATES = Path(__file__).parent / "templates"


class Pages:
    """The pages of one console; every page embeds its view and the double-submit token."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.config = console.config
        self.templates = Jinja2Templates(directory=str(TEMPLATES))

    def routes(self) -> list[Route]:
        """The pages before the API routes (/apps and /history are added with the API)."""
        return [
            Route("/", self.overview_page),
            Route("/nodes/{node}", self.node_page),
            Route("/apps/{app}", self.app_page),
            Route("/rollouts/{revision}", self.rollout_page),
            Route("/events", self.events_page),
        ]

    def more_routes(self) -> list[Route]:
        return [Route("/apps", self.apps_page), Route("/history", self.history_page)]

    def render(self, request: Request, template: str, kind: str, data: Any,
               **extra: Any) -> Response:
        config = self.config
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        response = self.templates.TemplateResponse(request, template, {
            "kind": kind, "data": data, "csrf": csrf, "actions": config.actions,
            "insecure": config.insecure, "trace_url": config.trace_url, **extra,
        })
        response.set_cookie(CSRF_COOKIE, csrf, httponly=False, samesite="strict", path="/")
        return response

    async def overview_page(self, request: Request) -> Response:
        return self.render(request, "overview.html", "overview",
                           self.console.view("overview", None), title="Fleet")

    async def node_page(self, request: Request) -> Response:
        node = request.path_params["node"]
        return self.render(request, "node.html", "node", self.console.view("node", node),
                           title=node, name=node)

    async def app_page(self, request: Request) -> Response:
        name = request.path_params["app"]
        return self.render(request, "app.html", "app", self.console.view("app", name),
                           title=name, name=name)

    async def rollout_page(self, request: Request) -> Response:
        rev = request.path_params["revision"]
        return self.render(request, "rollout.html", "rollout", self.console.view("rollout", rev),
                           title=f"rollout {rev[:12]}", name=rev)

    async def events_page(self, request: Request) -> Response:
        where, limit = event_query(request)
        return self.render(request, "events.html", "events",
                           self.console.view("events", where, limit), title="Events",
                           filters={"node": where.node or "", "app": where.app or "",
                                    "type": where.type or ""})

    async def apps_page(self, request: Request) -> Response:
        where = app_query(request)
        return self.render(request, "apps.html", "apps", self.console.view("apps", where),
                           title="Apps", filters={"name": where.name or "",
                                                  "layer": where.layer or "",
                                                  "label": "=".join(where.labels[0])
                                                  if where.labels else ""})

    async def history_page(self, request: Request) -> Response:
        revision = request.query_params.get("revision") or None
        return self.render(request, "history.html", "history",
                           self.console.view("history", revision), title="History",
                           name=revision or "")
