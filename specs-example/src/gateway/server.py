"""gateway: the edge entry point on gateway nodes; forwards /api/... to the api."""

from __future__ import annotations

import urllib.error
from typing import Any

import appkit

API = f"http://127.0.0.1:{appkit.port('API_PORT', 17103)}"


def forward(method: str) -> appkit.Route:
    def handler(rest: str, body: Any) -> tuple[int, Any]:
        try:
            return 200, appkit.call(method, f"{API}/{rest}", body)
        except urllib.error.HTTPError as exc:
            return exc.code, {"error": f"api answered {exc.code}"}
        except OSError as exc:
            return 502, {"error": f"api unreachable: {exc}"}

    return handler


def health(_rest: str, _body: Any) -> tuple[int, Any]:
    return 200, {"status": "ok", "version": appkit.RELEASE["version"]}


if __name__ == "__main__":
    appkit.serve(
        appkit.port("GATEWAY_PORT", 17106),
        {
            ("GET", "/health"): health,
            ("GET", "/api/"): forward("GET"),
            ("POST", "/api/"): forward("POST"),
        },
    )
