"""Benchmark the pure core: loading specs, planning a big node, finding cycles.

Run: PATH=/tmp/gmvenv/bin:$PATH python bench/bench_core.py [--files 1000] [--apps 10000]
Prints min, median and p90 in milliseconds (min is the least disturbed by other load on
the machine); nothing is asserted. Targets (issue #2): load and
validate 1,000 files <= 150 ms; plan 10,000 apps / 30,000 edges <= 300 ms.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reconciler.core.graph import DependencyGraph
from reconciler.core.loader import ParseCache, SpecFile, load_files
from reconciler.core.plan import make_plan
from reconciler.core.spec import AppSpec
from reconciler.core.state import CurrentApp, CurrentState, DesiredState
from reconciler.node.spec_dir import load_directory, read_directory

SPEC = """\
# app {i}: a realistic document, like specs-example/apps/api.yaml
name: app-{i}
version: "1.{i}.0"
description: Service number {i} of the benchmark fleet.
layer: backend
labels: {{team: core, tier: "{tier}"}}
depends_on: [{deps}]
source:
  type: archive
  url: artifacts/app-{i}-1.{i}.0.tar.gz
  sha256: {sha}
  strip_components: 1
run:
  command: [python3, server.py, --port, "{port}"]
  env:
    APP_PORT: "{port}"
    LOG_LEVEL: info
health:
  http:
    url: http://127.0.0.1:{port}/health
  interval: 2s
  timeout: 1s
  start_timeout: 30s
restart:
  policy: always
  backoff: {{initial: 1s, max: 30s}}
"""


def spec_text(i: int) -> str:
    deps = ", ".join(f"app-{j}" for j in (i - 1, i - 3, i - 10) if j >= 0)
    sha = hashlib.sha256(str(i).encode()).hexdigest()
    return SPEC.format(i=i, deps=deps, tier=i % 3, sha=sha, port=20000 + i % 40000)


def measure(label: str, rounds: int, step: Callable[[], object]) -> None:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    p90 = samples[min(len(samples) - 1, int(len(samples) * 0.9))]
    print(f"{label:<50} min {samples[0]:7.1f} ms  median {statistics.median(samples):7.1f} ms"
          f"  p90 {p90:7.1f} ms  (n={rounds})")


def bench_load(files: int, rounds: int) -> None:
    texts = {f"apps/app-{i}.yaml": spec_text(i).encode() for i in range(files)}
    spec_files = [SpecFile(p, d, key=str(hash(d))) for p, d in texts.items()]
    result = load_files(spec_files)
    assert result.ok and len(result.apps) == files, result.problems[:3]
    measure(f"load+validate {files} files (in memory)", rounds, lambda: load_files(spec_files))
    cache = ParseCache()
    load_files(spec_files, cache)
    changed = [*spec_files[:-1], SpecFile(spec_files[-1].path, spec_files[-1].data + b"\n",
                                          key="changed")]
    measure(f"load {files} files, 1 changed (ParseCache)", rounds,
            lambda: load_files(changed if cache.misses % 2 else spec_files, cache))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "apps").mkdir()
        for path, data in texts.items():
            (root / path).write_bytes(data)
        measure(f"read_directory + load {files} files", rounds, lambda: load_directory(root))
        measure(f"read_directory only {files} files", rounds,
                lambda: read_directory(root, "apps"))
        env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x.invalid",
               "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x.invalid"}
        for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "specs"]):
            subprocess.run(["git", *args], cwd=root, env=env, check=True)
        from reconciler.node.source import GitSource

        source = GitSource(str(root), "main", root / ".cache")
        try:
            revision = source.fetch()
            measure(f"git tree: spec_files + load {files} files", rounds,
                    lambda: load_files(source.spec_files(revision, "apps")))
            git_cache = ParseCache()
            measure("git tree: spec_files + load, warm ParseCache", rounds,
                    lambda: load_files(source.spec_files(revision, "apps"), git_cache))
        finally:
            source.close()


def big_graph(n: int) -> tuple[dict[str, AppSpec], CurrentState]:
    apps: dict[str, AppSpec] = {}
    for i in range(n):
        deps = [f"a{j}" for j in (i - 1, i - 17, i - 400) if j >= 0]
        apps[f"a{i}"] = AppSpec(name=f"a{i}", version="1.0", depends_on=deps)
    current: dict[str, CurrentApp] = {}
    for i, (name, spec) in enumerate(apps.items()):
        if i % 10 == 0:
            continue  # to deploy
        version = "0.9" if i % 10 == 1 else spec.version  # to upgrade
        current[name] = CurrentApp(name, version, spec.spec_hash(), running=i % 10 != 2,
                                   depends_on=tuple(spec.depends_on))
    for i in range(n // 20):
        current[f"old{i}"] = CurrentApp(f"old{i}", "1.0", "x", depends_on=(f"old{i - 1}",))
    return apps, CurrentState(current)


def bench_plan(n: int, rounds: int) -> None:
    apps, current = big_graph(n)
    edges = sum(len(a.depends_on) for a in apps.values())
    desired = DesiredState("rev", apps)
    plan = make_plan(desired, current)
    kinds: dict[str, int] = {}
    for action in plan.actions:
        kinds[action.kind.value] = kinds.get(action.kind.value, 0) + 1
    print(f"plan of {n} apps / {edges} edges: {kinds}, {len(plan.unchanged)} unchanged")
    measure(f"make_plan {n} apps, {edges} edges", rounds, lambda: make_plan(desired, current))

    def cold() -> object:
        for spec in apps.values():  # as on the first reconcile after the agent starts
            spec.__dict__.pop("_hashes", None)  # the memo of AppSpec.spec_hash
        return make_plan(desired, current)

    measure("make_plan, spec hashes not memoized yet", rounds, cold)
    measure("  of which DependencyGraph.from_apps + generations", rounds,
            lambda: DependencyGraph.from_apps(apps).generations())

    graph = DependencyGraph.from_apps(apps)
    measure(f"find_cycles {n} apps, no cycle", rounds, graph.find_cycles)
    cyclic = dict(apps)
    cyclic["a0"] = AppSpec(name="a0", version="1.0", depends_on=[f"a{n - 1}"])
    cyclic_graph = DependencyGraph.from_apps(cyclic)
    assert len(cyclic_graph.find_cycles()) == 1
    measure(f"find_cycles {n} apps, one cycle through all", rounds, cyclic_graph.find_cycles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--apps", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    bench_load(args.files, args.rounds)
    bench_plan(args.apps, args.rounds)


if __name__ == "__main__":
    main()
