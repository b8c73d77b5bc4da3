"""worker: follows the broker's `items` topic and checks each new item through the api."""

from __future__ import annotations

import threading
import time
import urllib.error
from typing import Any

import appkit

API = f"http://127.0.0.1:{appkit.port('API_PORT', 17103)}"
BROKER = f"http://127.0.0.1:{appkit.port('BROKER_PORT', 17101)}"
state: dict[str, Any] = {"processed": 0, "last_seq": -1, "last_error": None}


def follow() -> None:
    while True:
        try:
            batch = appkit.call("GET", f"{BROKER}/topics/items?after={state['last_seq']}")
            for message in batch["messages"]:
                appkit.call("GET", f"{API}/items")
                state["processed"] += 1
                state["last_seq"] = message["seq"]
            state["last_error"] = None
        except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
            state["last_error"] = str(exc)
        time.sleep(1.0)


def health(_rest: str, _body: Any) -> tuple[int, Any]:
    return 200, {"status": "ok", "version": appkit.RELEASE["version"], **state}


if __name__ == "__main__":
    appkit.wait_for(f"{API}/health", "api")
    threading.Thread(target=follow, daemon=True).start()
    appkit.serve(appkit.port("WORKER_PORT", 17104), {("GET", "/health"): health})
