"""Benchmark one agent's start: `gitops-mesh node --once` (one app, a local bare repo, a fresh
state dir: the first clone included), CPU and wall, and where its imports go; and a serving
agent (`node --nats URL`, the production shape) from its start to its first reconcile
finished. The old code (another checkout) in the same run, interleaved, with the same
interpreter and packages.

Run: PATH=.venv/bin:$PATH python bench/bench_start.py [--runs 15] [--old DIR]
     (DIR: e.g. `git worktree add --detach /tmp/old-start main`; its code runs with
     PYTHONPATH=DIR; nats-server from PATH). Prints medians; nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}
# Packages shown in the import breakdown (the rest is summed as "other").
SHOWN = ("pydantic", "pydantic_core", "git", "networkx", "apscheduler", "opentelemetry",
         "nats", "yaml", "psutil", "asyncio", "sqlite3", "reconciler")


def make_repo(tmp: Path) -> Path:
    work, bare = tmp / "work", tmp / "specs.git"
    (work / "apps").mkdir(parents=True)
    (work / "apps" / "hello.yaml").write_text('name: hello\nversion: "1"\n')
    for args in (["init", "-q", "-b", "main", str(work)], ["-C", str(work), "add", "-A"],
                 ["-C", str(work), "commit", "-q", "-m", "one app"],
                 ["clone", "-q", "--bare", str(work), str(bare)]):
        subprocess.run(["git", *args], env=GIT_ENV, check=True, capture_output=True)
    return bare


def tree_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tree)  # before site-packages: this tree's `reconciler`
    return env


def timed(tree: Path, bare: Path, state: Path) -> tuple[float, float]:
    """(CPU s, wall s) of one `node --once` (the child's own usage, git children included)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "node", "--once", "--repo", str(bare),
         "--node-id", "n1", "--state-dir", str(state)],
        cwd=state.parent, env=tree_env(tree), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: node --once exited {proc.returncode}")
    return usage.ru_utime + usage.ru_stime, wall


def command(tree: Path, cwd: Path, *args: str) -> float:
    """CPU s of one `gitops-mesh ARGS` (exit code not checked: some answer 1 by design)."""
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", *args], cwd=cwd,
                            env=tree_env(tree), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_utime + usage.ru_stime


def serving(tree: Path, bare: Path, state: Path, nats_url: str) -> tuple[float, float]:
    """(CPU s, wall s) of `node --nats URL` from its start to its first reconcile finished
    (then SIGTERM; the CPU of stopping is included)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "node", "--repo", str(bare), "--node-id",
         state.name, "--state-dir", str(state), "--interval", "1h", "--nats", nats_url],
        cwd=state.parent, env=tree_env(tree), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "reconcile.finished" in line:
            break
    else:
        raise SystemExit(f"{tree}: the agent ended before its first reconcile finished")
    wall = time.perf_counter() - started
    proc.send_signal(signal.SIGTERM)
    proc.stderr.read()
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_utime + usage.ru_stime, wall


def start_nats(tmp: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    binary = shutil.which("nats-server")
    if binary is None:
        return None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd",
                               str(tmp / "js")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, f"nats://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    server.kill()
    return None


def import_breakdown(tree: Path, bare: Path, state: Path) -> dict[str, float]:
    """ms per package of one `node --once` under -X importtime: each module's own time goes
    to the nearest package of SHOWN it was imported for (json for pydantic is pydantic's),
    else to `reconciler` or `other` (the standard library the project itself imports).
    The project's own modules also appear one by one, as `reconciler.x.y` keys."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "reconciler", "node", "--once", "--repo",
         str(bare), "--node-id", "n1", "--state-dir", str(state)],
        cwd=state.parent, env=tree_env(tree), capture_output=True, text=True, check=True)
    rows = []
    modules: list[tuple[int, int, str]] = []  # the project's own modules: (own us, -, name)
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((int(m[1]), len(m[3]) // 2, m[4].split(".")[0]))
            if m[4].startswith("reconciler."):
                modules.append((int(m[1]), 0, m[4]))
    out: collections.defaultdict[str, float] = collections.defaultdict(float)
    stack: list[tuple[int, str]] = []  # the importing modules' (depth, top-level package)
    for own_us, depth, top in reversed(rows):  # a parent comes after its children
        while stack and stack[-1][0] >= depth:
            stack.pop()
        stack.append((depth, top))
        owner = next((t for _, t in reversed(stack) if t in SHOWN and t != "reconciler"),
                     top if top == "reconciler" else "other")
        out[owner] += own_us / 1000
    out["total"] = sum(out.values())
    for own_us, _, name in modules:
        out[name] += own_us / 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--imports", type=int, default=5, help="-X importtime runs per tree")
    parser.add_argument("--old", type=Path, default=None, help="checkout of the old code")
    parser.add_argument("--modules", type=int, default=12,
                        help="how many of the project's own modules to list (0: none)")
    opts = parser.parse_args()
    trees = {"new": ROOT}
    if opts.old is not None:
        trees["old"] = opts.old.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp_name:
        tmp = Path(tmp_name)
        bare = make_repo(tmp)
        for name, tree in trees.items():  # warm-up: writes the bytecode caches
            found = subprocess.run(
                [sys.executable, "-c", "import reconciler; print(reconciler.__file__)"],
                cwd=tmp, env=tree_env(tree), capture_output=True, text=True, check=True).stdout
            assert found.startswith(str(tree)), (name, found)
            timed(tree, bare, tmp / f"warm-{name}")
        cpu: dict[str, list[float]] = {n: [] for n in trees}
        wall: dict[str, list[float]] = {n: [] for n in trees}
        for i in range(opts.runs):
            for name, tree in trees.items():  # interleaved: the same load for both
                c, w = timed(tree, bare, tmp / f"state-{name}-{i}")
                cpu[name].append(c)
                wall[name].append(w)
        commands: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        for _ in range(opts.runs):
            for name, tree in trees.items():
                commands[("validate", name)].append(
                    command(tree, tmp, "validate", str(ROOT / "specs-example")))
        served = start_nats(tmp)
        serve_cpu: dict[str, list[float]] = {n: [] for n in trees}
        serve_wall: dict[str, list[float]] = {n: [] for n in trees}
        if served is not None:
            server, url = served
            try:
                for i in range(opts.runs):
                    for name, tree in trees.items():
                        c, w = serving(tree, bare, tmp / f"serve-{name}-{i}", url)
                        serve_cpu[name].append(c)
                        serve_wall[name].append(w)
                for _ in range(opts.runs):
                    for name, tree in trees.items():
                        commands[("status --nats", name)].append(
                            command(tree, tmp, "status", "--nats", url, "--json"))
            finally:
                server.terminate()
                server.wait()
        imports: dict[str, list[dict[str, float]]] = {n: [] for n in trees}
        for i in range(opts.imports):
            for name, tree in trees.items():
                imports[name].append(import_breakdown(tree, bare, tmp / f"imp-{name}-{i}"))

    load = os.getloadavg()[0]
    print(f"agent start: `gitops-mesh node --once`, one app, fresh state dir "
          f"({opts.runs} runs each, interleaved; load average {load:.1f})")
    print(f"{'':8} {'CPU median':>11} {'CPU min':>8} {'wall median':>12} {'wall min':>9}")
    for name in trees:
        print(f"{name:8} {statistics.median(cpu[name]):10.3f}s {min(cpu[name]):7.3f}s "
              f"{statistics.median(wall[name]):11.3f}s {min(wall[name]):8.3f}s")
    if any(serve_cpu.values()):
        print("\nserving agent: `gitops-mesh node --nats URL` (JetStream on loopback) from its "
              "start to its first reconcile finished")
        print(f"{'':8} {'CPU median':>11} {'CPU min':>8} {'wall median':>12} {'wall min':>9}")
        for name in trees:
            print(f"{name:8} {statistics.median(serve_cpu[name]):10.3f}s "
                  f"{min(serve_cpu[name]):7.3f}s {statistics.median(serve_wall[name]):11.3f}s "
                  f"{min(serve_wall[name]):8.3f}s")
    print("\nCLI commands, CPU median (validate specs-example; status --nats URL --json)")
    print(f"{'':16}" + "".join(f"{n:>9}" for n in trees))
    for what in dict.fromkeys(w for w, _ in commands):
        print(f"{what:16}" + "".join(
            f"{statistics.median(commands[(what, n)]):8.3f}s" for n in trees))
    print(f"\nimports (-X importtime, ms, median of {opts.imports}; a package's own "
          "dependencies counted under it)")
    groups = sorted({g for runs in imports.values() for r in runs for g in r} - {"total"},
                    key=lambda g: -statistics.median(r.get(g, 0.0) for r in imports["new"]))
    packages = [g for g in groups if "." not in g]
    print(f"{'package':14}" + "".join(f"{n:>9}" for n in trees))
    for group in [*packages, "total"]:
        print(f"{group:14}" + "".join(
            f"{statistics.median(r.get(group, 0.0) for r in imports[n]):9.1f}"
            for n in trees))
    if opts.modules:
        print(f"\nthe project's own modules, self ms (median of {opts.imports}), the "
              f"{opts.modules} costliest in either tree")
        median = {(g, n): statistics.median(r.get(g, 0.0) for r in imports[n])
                  for g in groups if "." in g for n in trees}
        ranked = sorted({g for g, _ in median}, key=lambda g: -max(
            median[(g, n)] for n in trees))[:opts.modules]
        print(f"{'module':34}" + "".join(f"{n:>9}" for n in trees))
        for module in ranked:
            print(f"{module:34}" + "".join(f"{median[(module, n)]:9.1f}" for n in trees))


if __name__ == "__main__":
    main()
