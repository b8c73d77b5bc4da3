"""Fleet rollout benchmarks (prints numbers, asserts nothing).

    PATH=.venv/bin:$PATH python bench/bench_rollout.py [--nodes 1,100] [--rounds 3]

1. Coordination overhead: push -> `gitops-mesh wait` returns, for N in-process agents
   (reconciler.node.agent.Agent, each with its own clone and Mesh, the mesh's coordinator
   injected as `gitops-mesh node` does; apps without processes), the same agents in the same
   run alternating between a revision without rollout.yaml and one governed by a single `{}`
   wave with max_unavailable 100%. Prints both medians and their ratio (target <= 1.2x).
2. Wave hand-over: a canary wave of one node and a fleet wave of the rest, bake 1 s; the
   time from the canary's wave being synced + bake to the first fleet node claiming its slot
   and starting (target <= 1 s), read from the entry's own timestamps (one clock).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import git, make_spec_repo, start_nats  # noqa: E402

import reconciler  # noqa: E402
from reconciler.core.events import parse_time  # noqa: E402
from reconciler.core.rollout import RolloutEntry  # noqa: E402
from reconciler.mesh.link import Mesh, NatsOptions, connect  # noqa: E402
from reconciler.mesh.rollouts import read_entry, rollouts_bucket  # noqa: E402
from reconciler.node.agent import Agent, AgentConfig  # noqa: E402

PY = sys.executable
HOOK = Path(reconciler.__file__).parent / "hooks" / "post-receive"
ONE_WAVE = "waves:\n  - name: all\n    nodes: {}\n    max_unavailable: 100%\nbake: 0s\n"
CANARY = ("waves:\n  - name: canary\n    nodes: {match: {ring: canary}}\n    max_unavailable: 1\n"
          "  - name: fleet\n    nodes: {}\n    max_unavailable: 50%\nbake: 1s\n")


async def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        print(f"  ! {' '.join(cmd[:4])}... exited {proc.returncode}:\n{err.decode()[-4000:]}")
    return proc.returncode or 0


async def start_fleet(tmp: Path, url: str, repo: Any, n: int, tag: str,
                      labels_of: Any = None) -> tuple[list[Agent], list[Mesh]]:
    agents, meshes = [], []
    for i in range(n):
        labels = {"bench": tag, **(labels_of(i) if labels_of else {})}
        agent = Agent(AgentConfig(node_id=f"{tag}-{i}", repo_url=repo.url, labels=labels,
                                  state_dir=tmp / f"{tag}-{i}", interval=3600.0))
        mesh = Mesh(agent, agent.store, NatsOptions(servers=[url]), heartbeat=10.0)
        agent.coordinator = mesh.coordinator
        await agent.start()
        await mesh.start()
        agents.append(agent)
        meshes.append(mesh)
    while not all(m.ready for m in meshes):
        await asyncio.sleep(0.05)
    # `wait --selector` needs every node's status in gitops_nodes (the first round once
    # started before the last status was written)
    nc = await connect(NatsOptions(servers=[url]))
    try:
        kv = await nc.jetstream().key_value("gitops_nodes")
        wanted = {f"{tag}-{i}" for i in range(n)}
        while not wanted <= set(await kv.keys()):
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    return agents, meshes


async def stop_fleet(agents: list[Agent], meshes: list[Mesh]) -> None:
    for mesh in meshes:
        await mesh.close()
    for agent in agents:
        await agent.close()


def push_env(url: str) -> dict[str, str]:
    return {**os.environ, "GITOPS_MESH_NATS": url, "GITOPS_MESH_BIN": f"{PY} -m reconciler"}


async def push_and_wait(repo: Any, url: str, tag: str, files: dict[str, str | None]) -> float:
    for path, text in files.items():
        if text is None:
            if (repo.work / path).exists():
                repo.remove(path)
        else:
            repo.write(path, text)
    git(repo.work, "add", "-A")
    git(repo.work, "commit", "-q", "-m", "bench")
    sha = git(repo.work, "rev-parse", "HEAD")
    start = time.perf_counter()
    await run(["git", "push", "-q", "origin", "HEAD:main"], cwd=repo.work, env=push_env(url))
    code = await run([PY, "-m", "reconciler", "wait", "--nats", url, "--revision", sha,
                      "--selector", f"bench={tag}", "--timeout", "120s"])
    if code:
        print(f"  ! wait exited {code} for {tag}")
    return time.perf_counter() - start


async def bench_overhead(tmp: Path, url: str, n: int, rounds: int
                         ) -> tuple[list[float], list[float]]:
    tag = f"o{n}"
    repo = make_spec_repo(tmp / f"specs-{tag}", {"apps/web.yaml": 'name: web\nversion: "0"\n'})
    shutil.copy(HOOK, repo.bare / "hooks" / "post-receive")
    agents, meshes = await start_fleet(tmp, url, repo, n, tag)
    plain, governed = [], []
    version = 0
    try:
        for _ in range(rounds):
            version += 1
            plain.append(await push_and_wait(repo, url, tag, {
                "rollout.yaml": None, "apps/web.yaml": f'name: web\nversion: "{version}"\n'}))
            version += 1
            governed.append(await push_and_wait(repo, url, tag, {
                "rollout.yaml": ONE_WAVE, "apps/web.yaml": f'name: web\nversion: "{version}"\n'}))
    finally:
        await stop_fleet(agents, meshes)
    return plain, governed


async def print_history(kv: Any, sha: str) -> None:
    """The entry's kept revisions (the bucket keeps a few), to tell what went wrong."""
    try:
        history = await kv.history(sha)
    except Exception as exc:  # a diagnostic: never the bench's failure
        print(f"    (no history: {exc!r})")
        return
    for update in history:
        print(f"    rev {update.revision}: {update.value.decode() if update.value else None}")


async def bench_handover(tmp: Path, url: str, n: int, rounds: int) -> list[float]:
    tag = f"h{n}"
    repo = make_spec_repo(tmp / f"specs-{tag}", {"apps/web.yaml": 'name: web\nversion: "0"\n'})
    shutil.copy(HOOK, repo.bare / "hooks" / "post-receive")
    agents, meshes = await start_fleet(tmp, url, repo, n, tag,
                                       lambda i: {"ring": "canary"} if i == 0 else {})
    nc = await connect(NatsOptions(servers=[url]))
    gaps: list[float] = []
    try:
        kv = await rollouts_bucket(nc.jetstream())
        assert kv is not None
        for r in range(1, rounds + 1):
            watcher = await kv.watch("*")  # the entries, not the nodes' report keys
            first_claim: dict[str, str] = {}

            async def watch(watcher: Any = watcher, claims: dict[str, str] = first_claim) -> None:
                while True:
                    update = await watcher.updates(timeout=120)
                    if update is None or not update.value:
                        continue
                    entry = RolloutEntry.from_json(update.value)
                    for node, since in entry.applying.items():
                        if node in entry.waves[1].nodes:
                            claims.setdefault(entry.revision, since)

            watching = asyncio.ensure_future(watch())
            await push_and_wait(repo, url, tag, {
                "rollout.yaml": CANARY, "apps/web.yaml": f'name: web\nversion: "{r}"\n'})
            watching.cancel()
            await watcher.stop()
            sha = git(repo.work, "rev-parse", "HEAD")
            entry, _ = await read_entry(kv, sha)
            if entry is None or sha not in first_claim:
                print(f"  ! round {r}: no fleet claim seen")
                await print_history(kv, sha)
                continue
            synced = parse_time(entry.waves[0].synced_at)
            claimed = parse_time(first_claim[sha])
            if synced is None or claimed is None:
                continue
            gaps.append((claimed - synced).total_seconds() - entry.bake_s)
            if gaps[-1] < 0:
                print(f"  ! round {r}: a fleet node claimed {-gaps[-1]:.3f}s before the bake"
                      " ended")
                await print_history(kv, sha)
    finally:
        await nc.close()
        await stop_fleet(agents, meshes)
    return gaps


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", default="1,100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--handover-nodes", type=int, default=10)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    server = start_nats(tmp)
    try:
        print(f"nats-server {server.url}, {os.cpu_count()} CPUs; agents: "
              "reconciler.node.agent.Agent in this process (own clone each, apps without "
              "processes), coordinator injected")
        print("push -> wait returns, without rollout.yaml vs one {} wave, max_unavailable 100%:")
        for n in [int(x) for x in args.nodes.split(",") if x]:
            plain, governed = await bench_overhead(tmp, server.url, n, args.rounds)
            a, b = statistics.median(plain), statistics.median(governed)
            print(f"  {n:4d} node(s): no rollout.yaml median {a:.2f}s "
                  f"({', '.join(f'{t:.2f}' for t in plain)}); governed median {b:.2f}s "
                  f"({', '.join(f'{t:.2f}' for t in governed)}); ratio {b / a:.2f}x")
        gaps = await bench_handover(tmp, server.url, args.handover_nodes, args.rounds)
        if gaps:
            print(f"canary synced + bake -> first fleet node starts ({args.handover_nodes} "
                  f"nodes, bake 1s): median {statistics.median(gaps) * 1000:.0f} ms, max "
                  f"{max(gaps) * 1000:.0f} ms ({', '.join(f'{g * 1000:.0f}' for g in gaps)})")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
