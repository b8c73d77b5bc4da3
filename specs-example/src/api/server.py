"""api: the stack's HTTP API. Needs the database and the broker up before it starts."""

from __future__ import annotations

import time
from typing import Any

import appkit

DB = f"http://127.0.0.1:{appkit.port('DATABASE_PORT', 17102)}"
BROKER = f"http://127.0.0.1:{appkit.port('BROKER_PORT', 17101)}"
VERSION = appkit.RELEASE["version"]


def health(_rest: str, _body: Any) -> tuple[int, Any]:
    if appkit.RELEASE.get("broken_health"):
        # A deliberately bad release: the demo pushes it to show an automatic rollback.
        return 500, {"status": "broken", "version": VERSION}
    return 200, {"status": "ok", "version": VERSION}


def list_items(_rest: str, _body: Any) -> tuple[int, Any]:
    items = appkit.call("GET", f"{DB}/kv/item/")
    return 200, {"items": items, "served_by": VERSION}


def create_item(_rest: str, body: Any) -> tuple[int, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        return 400, {"error": 'POST /items with {"id": "...", ...}'}
    appkit.call("PUT", f"{DB}/kv/item/{body['id']}", body)
    appkit.call("POST", f"{BROKER}/publish/items", {"created": body["id"]})
    return 200, {"created": body["id"]}


def version(_rest: str, _body: Any) -> tuple[int, Any]:
    return 200, {"version": VERSION, "features": appkit.RELEASE.get("features", [])}


if __name__ == "__main__":
    # The dependency order matters: without the database and the broker the api gives up
    # (exit 3) and the agent reports it failed.
    appkit.wait_for(f"{DB}/health", "database")
    appkit.wait_for(f"{BROKER}/health", "broker")
    appkit.call("PUT", f"{DB}/kv/api/started", {"version": VERSION, "time": time.time()})
    appkit.call("POST", f"{BROKER}/publish/events", {"api": "started", "version": VERSION})
    appkit.serve(
        appkit.port("API_PORT", 17103),
        {
            ("GET", "/health"): health,
            ("GET", "/items"): list_items,
            ("POST", "/items"): create_item,
            ("GET", "/version"): version,
        },
    )
