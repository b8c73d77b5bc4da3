"""metrics-agent: this node's load, memory and uptime as JSON (runs on every node)."""

from __future__ import annotations

import os
import time
from typing import Any

import appkit

STARTED = time.time()


def _meminfo() -> dict[str, int]:
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    info[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return info


def metrics(_rest: str, _body: Any) -> tuple[int, Any]:
    load1, load5, load15 = os.getloadavg()
    return 200, {
        "node": os.environ.get("GITOPS_NODE_ID", "unknown"),
        "load": [load1, load5, load15],
        "memory": _meminfo(),
        "agent_uptime_s": round(time.time() - STARTED, 1),
    }


def health(_rest: str, _body: Any) -> tuple[int, Any]:
    return 200, {"status": "ok", "version": appkit.RELEASE["version"]}


if __name__ == "__main__":
    appkit.serve(
        appkit.port("METRICS_PORT", 17105),
        {("GET", "/health"): health, ("GET", "/metrics"): metrics},
    )
