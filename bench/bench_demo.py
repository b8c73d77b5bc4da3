"""Benchmark the whole demo as a user sees it: start to ready, push to rolled out, Ctrl-C to exit.

Run: PATH=/tmp/gmvenv/bin:$PATH python bench/bench_demo.py [--pushes 5]
Starts `python -m reconciler demo` (3 nodes), then pushes changes to the demo repo and times
each until the console shows every node synced at the new revision (the path a push takes:
post-receive hook -> NATS -> agents -> status KV -> console): comment-only pushes (nothing to
do but fetch and report), then api upgrades (1.0.0 <-> 1.1.0: install the archive, stop,
start, wait for health on every node). Prints numbers only.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True,
                          capture_output=True, text=True).stdout.strip()


def fleet(port: int) -> list[dict[str, Any]]:
    try:
        nodes: list[dict[str, Any]] = httpx.get(
            f"http://127.0.0.1:{port}/api/fleet", timeout=2).json()["nodes"]
        return nodes
    except (httpx.HTTPError, ValueError, KeyError):
        return []


def wait_synced(port: int, count: int, revision: str | None, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        nodes = fleet(port)
        if len(nodes) == count and all(
            n["status"] == "synced" and (revision is None or n["revision"] == revision)
            for n in nodes
        ):
            return time.monotonic() - started
        time.sleep(0.05)
    raise SystemExit(f"not synced within {timeout}s: {fleet(port)}")


def push_and_wait(clone: Path, port: int, nodes: int, message: str) -> float:
    git(clone, "commit", "-qam", message)
    pushed = time.monotonic()
    git(clone, "push", "-q", "origin", "HEAD:main")
    wait_synced(port, nodes, git(clone, "rev-parse", "HEAD"))
    return time.monotonic() - pushed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pushes", type=int, default=5)
    parser.add_argument("--upgrades", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=3)
    opts = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        root = Path(tmp)
        lines: list[str] = []
        started = time.monotonic()
        demo = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "demo", "--port", str(port),
             "--nodes", str(opts.nodes), "--state-dir", str(root / "state")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert demo.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(demo.stdout or []), daemon=True)
        reader.start()
        try:
            wait_synced(port, opts.nodes, None)
            ready = time.monotonic() - started
            match = re.search(r"^\s*repo:\s+(\S+) at ", "".join(lines), re.M)
            assert match, "".join(lines)
            clone = root / "clone"
            git(root, "clone", "-q", match.group(1), str(clone))
            spec = sorted((clone / "apps").rglob("*.y*ml"))[0]
            rollouts = []
            for i in range(opts.pushes):
                with spec.open("a") as f:
                    f.write(f"# bench push {i}\n")
                rollouts.append(push_and_wait(clone, port, opts.nodes, f"bench push {i}"))
            upgrades = []
            api = clone / "apps" / "api.yaml"
            versions = [(clone / "upgrades" / "api-1.1.0.yaml").read_text(), api.read_text()]
            for i in range(opts.upgrades):
                api.write_text(versions[i % 2])
                upgrades.append(push_and_wait(clone, port, opts.nodes, f"api upgrade {i}"))
            stop = time.monotonic()
            demo.send_signal(signal.SIGINT)
            demo.wait(120)
            stopped = time.monotonic() - stop
        finally:
            if demo.poll() is None:
                demo.kill()
    python = sys.version.split()[0]
    print(f"demo with {opts.nodes} nodes on {os.cpu_count()} cores, Python {python}")
    print(f"  start -> every node synced (console):  {ready * 1000:8.0f} ms")
    for label, times in (("comment-only push", rollouts), ("api upgrade push", upgrades)):
        print(f"  {label} -> every node synced: median {statistics.median(times) * 1000:.0f} "
              f"ms, max {max(times) * 1000:.0f} ms ({len(times)} pushes, push included)")
    print(f"  SIGINT -> demo exited, apps stopped:   {stopped * 1000:8.0f} ms")

if __name__ == "__main__":
    main()
