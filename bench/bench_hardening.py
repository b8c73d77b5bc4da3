"""Benchmark the node hardening of issue #10: converging 5,000 file-only apps and 500 apps with
processes, taking up an upgrade pushed during that first deploy, and the downtime of a failed
upgrade with stop-first (early end), start-first and stop-first waiting the whole start_timeout.

Run: PATH=.venv/bin:$PATH python bench/bench_hardening.py [--files 5000] [--procs 500]
Prints numbers; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import PY, Repo, free_port, make_agent, sleep_app

# serves its version; "sick" answers 500 from the start (a definitely broken release)
APP = textwrap.dedent('''
    import http.server, sys
    port, version, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = version.encode()
            self.send_response(500 if mode == "sick" else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
''')


def file_app(name: str, version: str = "1") -> str:
    return f'name: {name}\nversion: "{version}"\n'


def http_app(script: Path, version: str, port: int, probe_port: int, mode: str,
             strategy: str, interval: str) -> str:
    return (f'name: web\nversion: "{version}"\n'
            f'run: {{command: [{PY}, {script}, "{port}", "{version}", {mode}], '
            f'stop_timeout: 2s}}\n'
            f'health: {{http: {{url: "http://127.0.0.1:{probe_port}/"}}, interval: {interval},'
            f' timeout: 1s, start_timeout: 8s, failure_threshold: 3}}\n'
            f'upgrade: {{strategy: {strategy}}}\n')


async def converge(root: Path, specs: dict[str, str], label: str) -> float:
    repo = Repo(root / "specs")
    for name, text in specs.items():
        repo.write(f"apps/{name}.yaml", text)
    repo.push()
    agent = await make_agent(repo, root / "state")
    started = time.perf_counter()
    run = await agent.reconcile_now()
    took = time.perf_counter() - started
    print(f"{label}: {len(specs)} apps in {took:.1f} s = {len(specs) / took:.0f} apps/s "
          f"({run.outcome})")
    await agent.close(stop_apps=True)
    return took


async def upgrade_during_first_deploy(root: Path, files: int) -> None:
    repo = Repo(root / "specs")
    repo.write("apps/web.yaml", sleep_app("web", "1"))
    repo.push()
    agent = await make_agent(repo, root / "state")
    await agent.reconcile_now()
    for i in range(files):
        repo.write(f"apps/f{i:05d}.yaml", file_app(f"f{i:05d}"))
    repo.push("many apps")
    run_id = agent.trigger("manual")
    await asyncio.sleep(2.0)  # the first deploy of the many apps is under way
    repo.write("apps/web.yaml", sleep_app("web", "2"))
    await asyncio.to_thread(repo.push, "web 2")
    pushed = time.perf_counter()
    agent.trigger("source changed")  # what gitops.source.changed does
    while True:
        web = agent.store.get_app("web")
        if web is not None and web.version == "2" and web.phase == "running":
            break
        await asyncio.sleep(0.01)
    applied = time.perf_counter() - pushed
    installed = len(agent.store.apps())
    await agent.loop.wait_run(run_id)
    print(f"upgrade pushed 2 s into a first deploy of {files} file-only apps: applied after "
          f"{applied:.2f} s ({installed - 1} of them installed by then)")
    await agent.close(stop_apps=True)


class Downtime:
    """Polls a port every 10 ms from a thread; sums the time it did not answer 200."""

    def __init__(self, port: int) -> None:
        self.port, self.down, self._stop = port, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Downtime:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1) as r:
                    ok = r.status == 200
            except OSError:
                ok = False
            now = time.perf_counter()
            if not ok:
                self.down += now - last
            last = now
            time.sleep(0.01)


async def failed_upgrade_downtime(root: Path, strategy: str, interval: str,
                                  label: str) -> None:
    root.mkdir(parents=True)
    script = root / "app.py"
    script.write_text(APP)
    repo = Repo(root / "specs")
    port = free_port()
    repo.write("apps/web.yaml", http_app(script, "1", port, port, "ok", strategy, interval))
    repo.push()
    agent = await make_agent(repo, root / "state")
    await agent.reconcile_now()
    # start-first runs the new version beside the old one: it takes its own port
    new_port = free_port() if strategy == "start-first" else port
    repo.write("apps/web.yaml", http_app(script, "2", new_port, new_port, "sick", strategy,
                                         interval))
    repo.push("web 2 (broken)")
    with Downtime(port) as downtime:
        started = time.perf_counter()
        run = await agent.reconcile_now()
        took = time.perf_counter() - started
        await asyncio.sleep(0.1)
    web = agent.store.get_app("web")
    print(f"failed upgrade, {label}: downtime {downtime.down:.2f} s, rolled back after "
          f"{took:.2f} s (now {web.version if web else '?'}, {run.outcome})")
    await agent.close(stop_apps=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--procs", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hardening-") as tmp:
        root = Path(tmp)
        await converge(root / "files", {f"f{i:05d}": file_app(f"f{i:05d}")
                                        for i in range(args.files)}, "file-only apps")
        await converge(root / "procs", {f"p{i:04d}": sleep_app(f"p{i:04d}")
                                        for i in range(args.procs)}, "apps with processes")
        await upgrade_during_first_deploy(root / "news", args.files)
        # the same broken release (answers 500) three ways
        await failed_upgrade_downtime(root / "old", "stop-first", "10s",
                                      "stop-first, whole start_timeout (8 s; as before)")
        await failed_upgrade_downtime(root / "early", "stop-first", "200ms",
                                      "stop-first, early end (3 failed probes 200 ms apart)")
        await failed_upgrade_downtime(root / "beside", "start-first", "200ms", "start-first")


if __name__ == "__main__":
    asyncio.run(main())
