"""broker: a tiny in-memory message broker over HTTP (publish to a topic, read after an index)."""

from __future__ import annotations

import threading
import time
from typing import Any

import appkit

topics: dict[str, list[dict[str, Any]]] = {}
lock = threading.Lock()


def publish(topic: str, body: Any) -> tuple[int, Any]:
    if not topic:
        return 400, {"error": "POST /publish/<topic>"}
    with lock:
        messages = topics.setdefault(topic, [])
        messages.append({"seq": len(messages), "time": time.time(), "data": body})
        return 200, {"topic": topic, "seq": len(messages) - 1}


def read(rest: str, _body: Any) -> tuple[int, Any]:
    topic, _, query = rest.partition("?")
    after = -1
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == "after" and value.lstrip("-").isdigit():
            after = int(value)
    with lock:
        messages = [m for m in topics.get(topic, []) if m["seq"] > after]
    return 200, {"topic": topic, "messages": messages}


def health(_rest: str, _body: Any) -> tuple[int, Any]:
    with lock:
        count = sum(len(m) for m in topics.values())
    return 200, {"status": "ok", "version": appkit.RELEASE["version"], "messages": count}


if __name__ == "__main__":
    appkit.serve(
        appkit.port("BROKER_PORT", 17101),
        {
            ("GET", "/health"): health,
            ("POST", "/publish/"): publish,
            ("GET", "/topics/"): read,
        },
    )
