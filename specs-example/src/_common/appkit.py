"""Tiny helpers shared by the example apps: ports with the node's offset, JSON over HTTP.

Every example app listens on 127.0.0.1 at a fixed base port plus GITOPS_PORT_OFFSET, which
the gitops-mesh agent exports (several demo nodes share one host). Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Route = Callable[[str, Any], tuple[int, Any]]

HERE = Path(__file__).resolve().parent
RELEASE: dict[str, Any] = json.loads((HERE / "release.json").read_text())


def offset() -> int:
    return int(os.environ.get("GITOPS_PORT_OFFSET", "0") or 0)


def port(env_name: str, base: int) -> int:
    """The base port from env `env_name` (or `base`) plus this node's offset."""
    return int(os.environ.get(env_name, base)) + offset()


def log(message: str) -> None:
    print(f"[{RELEASE['app']} {RELEASE['version']}] {message}", flush=True)


def call(method: str, url: str, body: Any = None, timeout: float = 2.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def wait_for(url: str, what: str) -> None:
    """Retry `url` until it answers 200, for DEPENDENCY_WAIT seconds (default 20); exit 3 if
    it never does (the agent reports the app failed, and starts it again)."""
    deadline = time.monotonic() + float(os.environ.get("DEPENDENCY_WAIT", "20"))
    while True:
        try:
            call("GET", url, timeout=1.0)
            return
        except (OSError, urllib.error.URLError) as exc:
            if time.monotonic() > deadline:
                log(f"{what} not reachable at {url}: {exc}; giving up")
                sys.exit(3)
            time.sleep(0.2)


def serve(listen_port: int, routes: dict[tuple[str, str], Route]) -> None:
    """Serve `routes` ((method, path prefix) -> handler(rest_of_path, json_body)) until
    SIGTERM/SIGINT. The longest matching prefix wins."""
    ordered = sorted(routes.items(), key=lambda item: -len(item[0][1]))

    class Handler(BaseHTTPRequestHandler):
        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = None
            if length:
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    self._reply(400, {"error": "body must be JSON"})
                    return
            for (route_method, prefix), handler in ordered:
                if route_method == method and self.path.startswith(prefix):
                    try:
                        status, payload = handler(self.path[len(prefix):], body)
                    except Exception as exc:  # an example app reports, it does not crash
                        status, payload = 500, {"error": str(exc)}
                    self._reply(status, payload)
                    return
            self._reply(404, {"error": f"no route for {method} {self.path}"})

        def _reply(self, status: int, payload: Any) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_PUT(self) -> None:
            self._handle("PUT")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # health probes every few seconds would drown the app's own log

    server = ThreadingHTTPServer(("127.0.0.1", listen_port), Handler)
    server.daemon_threads = True

    def stop(signum: int, _frame: Any) -> None:
        log(f"signal {signum}: stopping")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"listening on 127.0.0.1:{listen_port} (node {os.environ.get('GITOPS_NODE_ID', '?')})")
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    log("stopped")
