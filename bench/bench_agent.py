"""Benchmark the node agent: push-to-healthy, no-op reconcile CPU, one change among many specs,
agent RSS with 20 apps, 20 independent apps started in parallel vs one by one.

Run: PATH=/tmp/gmvenv/bin:$PATH python bench/bench_agent.py [--pushes 20] [--specs 500]
Prints numbers (ms, MB); nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reconciler.node.agent import Agent, AgentConfig
from reconciler.node.source import GitSource

ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}
PY = sys.executable
APP = textwrap.dedent('''
    import http.server, os, sys
    port = int(sys.argv[1]) + int(os.environ.get("GITOPS_PORT_OFFSET", "0"))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = sys.argv[2].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
''')


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


class Repo:
    def __init__(self, root: Path) -> None:
        self.bare, self.work = root / "remote.git", root / "work"
        self.bare.mkdir(parents=True)
        git(self.bare, "init", "-q", "--bare", "-b", "main")
        self.work.mkdir()
        git(self.work, "init", "-q", "-b", "main")
        git(self.work, "remote", "add", "origin", str(self.bare))

    def write(self, rel: str, text: str) -> None:
        path = self.work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def push(self, message: str = "update") -> None:
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", "origin", "HEAD:main")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_app(script: Path, name: str, version: str, port: int, deps: str = "") -> str:
    return (f'name: {name}\nversion: "{version}"\n{deps}'
            f'run: {{command: [{PY}, {script}, "{port}", "{version}"], stop_timeout: 2s}}\n'
            f'health: {{http: {{url: "http://127.0.0.1:{port}/"}}, interval: 5s}}\n')


def sleep_app(name: str, version: str = "1", labels: str = "") -> str:
    nodes = f"nodes: {{match: {{{labels}}}}}\n" if labels else ""
    return (f'name: {name}\nversion: "{version}"\n{nodes}'
            f'run: {{command: [sleep, "100000"], stop_timeout: 1s}}\n')


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def make_agent(repo: Repo, state: Path, node: str = "b1",
                     labels: dict[str, str] | None = None) -> Agent:
    agent = Agent(AgentConfig(node_id=node, repo_url=str(repo.bare), state_dir=state,
                              labels=labels or {}, interval=3600, heartbeat=3600))
    await agent.start(first_reconcile=False, schedule=False)
    return agent


def wait_answer(port: int, expect: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
                if resp.read().decode() == expect:
                    return
        except OSError:
            pass
        time.sleep(0.002)
    raise TimeoutError(f"port {port} never answered {expect}")


async def bench_push_to_healthy(root: Path, pushes: int) -> None:
    script = root / "app.py"
    script.write_text(APP)
    repo = Repo(root / "specs")
    port = free_port()
    repo.write("apps/web.yaml", http_app(script, "web", "0", port))
    repo.push()
    agent = await make_agent(repo, root / "state")
    await agent.reconcile_now()
    samples = []
    for i in range(1, pushes + 1):
        repo.write("apps/web.yaml", http_app(script, "web", str(i), port))
        repo.push(f"v{i}")
        started = time.perf_counter()  # from `git push` returning ...
        run = await agent.reconcile_now("bench")  # ... an immediate trigger (like notify)
        assert run.outcome == "success", run.message
        samples.append(time.perf_counter() - started)  # ... to the health check passing
    await agent.close(stop_apps=True)

    # the floor: git fetch of one new commit + spawning the app until it answers
    source = GitSource(str(repo.bare), "main", root / "floor-cache")
    source.poll()
    fetches, spawns = [], []
    for i in range(pushes):
        repo.write("apps/web.yaml", http_app(script, "web", f"f{i}", port))
        repo.push()
        t = time.perf_counter()
        source.poll()
        fetches.append(time.perf_counter() - t)
        t = time.perf_counter()
        proc = subprocess.Popen([PY, str(script), str(port), "x"], start_new_session=True,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        wait_answer(port, "x")
        spawns.append(time.perf_counter() - t)
        proc.terminate()
        proc.wait()
    source.close()
    p50 = statistics.median(samples)
    floor = statistics.median(fetches) + statistics.median(spawns)
    print(f"push-to-healthy (upgrade, immediate trigger), {pushes} pushes: "
          f"p50 {ms(p50)}, p90 {ms(sorted(samples)[int(len(samples) * 0.9) - 1])}, "
          f"min {ms(min(samples))}")
    print(f"  floor: git fetch p50 {ms(statistics.median(fetches))} + spawn-to-answer p50 "
          f"{ms(statistics.median(spawns))} = {ms(floor)}; ratio {p50 / floor:.2f}x "
          "(target p50 <= 250 ms)")


async def bench_noop_cpu(root: Path, apps: int) -> None:
    repo = Repo(root / "specs")
    for i in range(apps):
        repo.write(f"apps/s{i:03d}.yaml", sleep_app(f"s{i:03d}"))
    repo.push()
    agent = await make_agent(repo, root / "state")
    t = time.perf_counter()
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    deploy = time.perf_counter() - t
    cpu, wall = [], []
    for _ in range(20):
        c, w = time.process_time(), time.perf_counter()
        await agent.reconcile_now()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    status_cpu = time.process_time()
    for _ in range(20):
        agent.status()
    status_cpu = (time.process_time() - status_cpu) / 20
    await agent.close(stop_apps=True)
    print(f"no-op reconcile with {apps} apps running: CPU p50 {ms(statistics.median(cpu))} "
          f"(target <= 10 ms), wall p50 {ms(statistics.median(wall))}; "
          f"status() CPU {ms(status_cpu)}; first deploy of {apps} apps {ms(deploy)}")


async def bench_one_change(root: Path, specs: int, targeted: int) -> None:
    repo = Repo(root / "specs")
    for i in range(specs):
        labels = "" if i < targeted else "role: other"
        repo.write(f"apps/s{i:03d}.yaml", sleep_app(f"s{i:03d}", labels=labels))
    repo.push()
    agent = await make_agent(repo, root / "state", labels={"role": "edge"})
    await agent.reconcile_now()
    wall, cpu = [], []
    for round_ in range(1, 11):
        repo.write("apps/s000.yaml", sleep_app("s000", version=str(round_ + 1)))
        repo.push()
        c, w = time.process_time(), time.perf_counter()
        run = await agent.reconcile_now()
        assert run.outcome == "success", run.message
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    await agent.close(stop_apps=True)
    print(f"one app changed among {specs} specs ({targeted} on this node): wall p50 "
          f"{ms(statistics.median(wall))} (target <= 200 ms), CPU p50 "
          f"{ms(statistics.median(cpu))}")


def bench_rss(root: Path, apps: int) -> None:
    import psutil

    repo = Repo(root / "specs")
    for i in range(apps):
        repo.write(f"apps/s{i:02d}.yaml", sleep_app(f"s{i:02d}"))
    repo.push()
    state = root / "state"
    agent = subprocess.Popen(
        [PY, "-m", "reconciler", "node", "--repo", str(repo.bare), "--node-id", "rss",
         "--state-dir", str(state), "--interval", "2s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        from reconciler.cli.node_cmds import local_status

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status = local_status(state)
            except Exception:
                status = None
            if status and status.status == "synced" and len(status.apps) == apps:
                break
            time.sleep(0.1)
        time.sleep(3)  # a couple of polls after convergence
        rss = psutil.Process(agent.pid).memory_info().rss / 2**20
        print(f"agent RSS after start with {apps} apps: {rss:.1f} MB (target <= 50 MB)")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait()
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("GITOPS_NODE_ID") == "rss":
                    proc.kill()
            except psutil.Error:
                pass


async def bench_parallel(root: Path, apps: int) -> None:
    script = root / "app.py"
    script.write_text(APP)
    results = {}
    for mode in ("parallel", "one by one"):
        repo = Repo(root / mode.replace(" ", "-"))
        for i in range(apps):
            # one by one: a dependency chain forces the executor to start them in sequence
            deps = f"depends_on: [p{i - 1:02d}]\n" if mode != "parallel" and i else ""
            repo.write(f"apps/p{i:02d}.yaml", http_app(script, f"p{i:02d}", "1", free_port(),
                                                       deps))
        repo.push()
        agent = await make_agent(repo, root / f"state-{mode.replace(' ', '-')}")
        t = time.perf_counter()
        run = await agent.reconcile_now()
        assert run.outcome == "success", run.message
        results[mode] = time.perf_counter() - t
        await agent.close(stop_apps=True)
    print(f"{apps} apps with http health, full start: parallel {ms(results['parallel'])}, "
          f"one by one {ms(results['one by one'])}, "
          f"speed-up {results['one by one'] / results['parallel']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--noop-apps", type=int, default=100)
    parser.add_argument("--specs", type=int, default=500)
    parser.add_argument("--targeted", type=int, default=100)
    parser.add_argument("--rss-apps", type=int, default=20)
    parser.add_argument("--parallel-apps", type=int, default=20)
    parser.add_argument("--only", choices=["push", "noop", "one", "rss", "par"], action="append",
                        help="run only these parts (repeatable)")
    args = parser.parse_args()
    parts = set(args.only or ["push", "noop", "one", "rss", "par"])
    import logging

    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("push", "noop", "one", "rss", "par"):
            (root / sub).mkdir()
        if "push" in parts:
            asyncio.run(bench_push_to_healthy(root / "push", args.pushes))
        if "noop" in parts:
            asyncio.run(bench_noop_cpu(root / "noop", args.noop_apps))
        if "one" in parts:
            asyncio.run(bench_one_change(root / "one", args.specs, args.targeted))
        if "rss" in parts:
            bench_rss(root / "rss", args.rss_apps)
        if "par" in parts:
            asyncio.run(bench_parallel(root / "par", args.parallel_apps))


if __name__ == "__main__":
    main()
