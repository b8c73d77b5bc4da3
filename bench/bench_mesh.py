"""Mesh benchmarks (prints numbers, asserts nothing).

    PATH=/tmp/gmvenv/bin:$PATH python bench/bench_mesh.py [--nodes 1,10,50,100] [--events 20000]

1. push -> `gitops-mesh wait` returns, for N nodes: a bare spec repo with the shipped
   post-receive hook (which runs `gitops-mesh notify`), N agents in this process, each with
   its own state dir, Store and Mesh, then `git push` and `gitops-mesh wait --revision SHA`
   as subprocesses, timed together. `--agents real` (default): reconciler.node.agent.Agent with
   its own git clone, apps without processes (`run` absent), so the numbers are the mesh and
   the reconcile loop, not app start-up; `--agents fake`: tests/fake_agent.FakeAgent.
2. event throughput from one agent's sqlite outbox to the GITOPS_EVENTS stream, next to the
   NATS floor (raw pipelined js.publish_async of the same payloads) in the same run, 3 rounds
   interleaved. `--before DIR[,DIR]`: also an older tree's Mesh (a checkout, e.g.
   `git worktree add /tmp/old-mesh ea496a9`), in a child process against the same server;
   the current Mesh then runs in a child process too, for a like-for-like comparison.
3. RPC `status` round trip p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import git, make_spec_repo, start_nats  # noqa: E402
from fake_agent import FakeAgent  # noqa: E402

import reconciler  # noqa: E402
from reconciler.core.events import make_event  # noqa: E402
from reconciler.mesh.link import Mesh, NatsOptions, connect  # noqa: E402
from reconciler.mesh.provision import ensure, events_stream  # noqa: E402
from reconciler.mesh.subjects import EVENTS_STREAM, rpc_subject  # noqa: E402
from reconciler.node.store import Store  # noqa: E402

PY = sys.executable
HOOK = Path(reconciler.__file__).parent / "hooks" / "post-receive"
# One tree's Mesh draining COUNT events from its own outbox (argv: tree url count); prints
# events/s. Works for the flat layout of older trees (reconciler.bus) and the current one.
TREE_WORKER = """
import asyncio, os, sys, tempfile, time
tree, url, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path[:0] = [tree, os.path.join(tree, 'tests')]
# the venv's editable install would fill in modules the older tree lacks from this one
sys.meta_path = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]
from datetime import UTC, datetime
from pathlib import Path
from fake_agent import FakeAgent
if os.path.exists(os.path.join(tree, 'reconciler', 'mesh', 'link.py')):
    from reconciler.core.events import make_event
    from reconciler.mesh.link import Mesh, NatsOptions
    from reconciler.node.store import Store
else:
    from reconciler.bus import Mesh, NatsOptions
    from reconciler.events import make_event
    from reconciler.store import Store
async def main():
    store = Store(Path(tempfile.mkdtemp()) / 'events', outbox_max=count + 10)
    node = f'bench-tree-{os.getpid()}'
    now = datetime.now(UTC)
    with store.transaction():
        for _ in range(count):
            store.add_event(make_event('app.health-changed', node, now, app='web',
                                       message='health check'))
    mesh = Mesh(FakeAgent(store, node), store, NatsOptions(servers=[url]))
    start = time.perf_counter()
    await mesh.start()
    while store.outbox_stats()[0]:
        await asyncio.sleep(0.01)
    print(count / (time.perf_counter() - start))
    await mesh.close()
asyncio.run(main())
"""


async def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode:
        print(f"  ! {' '.join(cmd[:4])}... exited {proc.returncode}: {err.decode()[-300:]}")
    return proc.returncode or 0


def spec(version: int) -> dict[str, str]:
    return {
        "apps.json": json.dumps({"web": {"version": version}}),  # for FakeAgent
        "apps/web.yaml": f'name: web\nversion: "{version}"\n',  # for the real agent
    }


async def bench_push_wait(tmp: Path, url: str, n: int, kind: str, rounds: int = 3,
                          ) -> list[float]:
    repo = make_spec_repo(tmp / f"specs-{n}", spec(0))
    shutil.copy(HOOK, repo.bare / "hooks" / "post-receive")
    meshes, closers = [], []
    for i in range(n):
        node, labels = f"b{n}-{i}", {"bench": str(n)}
        if kind == "real":
            from reconciler.node.agent import Agent, AgentConfig

            agent = Agent(AgentConfig(node_id=node, repo_url=repo.url, labels=labels,
                                      state_dir=tmp / f"n{n}-{i}", interval=3600.0))
            await agent.start()
            store = agent.store
            closers.append(agent.close)
        else:
            store = Store(tmp / f"n{n}-{i}")
            agent = FakeAgent(store, node, labels, repo_url=repo.url)  # type: ignore[assignment]
            agent.trigger("startup")

            async def close_store(store: Store = store) -> None:
                store.close()

            closers.append(close_store)
        mesh = Mesh(agent, store, NatsOptions(servers=[url]), heartbeat=10.0)
        await mesh.start()
        meshes.append(mesh)
    while not all(m.ready for m in meshes):
        await asyncio.sleep(0.05)
    env = {**os.environ, "GITOPS_MESH_NATS": url, "GITOPS_MESH_BIN": f"{PY} -m reconciler"}
    times = []
    for r in range(1, rounds + 1):
        for path, text in spec(r).items():
            repo.write(path, text)
        git(repo.work, "add", "-A")
        git(repo.work, "commit", "-q", "-m", f"round {r}")
        sha = git(repo.work, "rev-parse", "HEAD")
        start = time.perf_counter()
        await run(["git", "push", "-q", "origin", "HEAD:main"], cwd=repo.work, env=env)
        code = await run([PY, "-m", "reconciler", "wait", "--nats", url, "--revision", sha,
                          "--selector", f"bench={n}", "--timeout", "60s"])
        times.append(time.perf_counter() - start)
        if code:
            print(f"  ! wait failed for {n} nodes")
    for mesh in meshes:
        await mesh.close()
    for close in closers:
        await close()
    return times


async def bench_events(tmp: Path, url: str, count: int, round_: int) -> tuple[float, float]:
    """(outbox -> stream events/s of this Mesh, in this process; the floor's events/s)."""
    from datetime import UTC, datetime

    node = f"bench-events-{round_}"
    store = Store(tmp / node, outbox_max=count + 10)
    agent = FakeAgent(store, node)
    now = datetime.now(UTC)
    events = [make_event("app.health-changed", node, now, app="web",
                         message="health check") for _ in range(count)]
    with store.transaction():
        for event in events:
            store.add_event(event)
    nc = await connect(NatsOptions(servers=[url]))
    js = nc.jetstream()
    await ensure(js, events_stream())
    # the floor: raw pipelined publishes of the same payloads, in batches of the Mesh's size
    start = time.perf_counter()
    batch = 512
    for i in range(0, count, batch):
        futures = [
            await js.publish_async(f"gitops.events.bench-floor.{e.type}", e.to_json_bytes(),
                                   headers={"Nats-Msg-Id": "floor-" + e.id})
            for e in events[i:i + batch]
        ]
        await asyncio.gather(*futures)
    floor = count / (time.perf_counter() - start)

    mesh = Mesh(agent, store, NatsOptions(servers=[url]))
    start = time.perf_counter()
    await mesh.start()
    while store.outbox_stats()[0]:
        await asyncio.sleep(0.01)
    mesh_rate = count / (time.perf_counter() - start)
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=f"gitops.events.{node}.>")
    stored = sum((info.state.subjects or {}).values())
    assert stored == count, f"{stored} != {count}"
    await mesh.close()
    await nc.close()
    store.close()
    return mesh_rate, floor


async def bench_events_tree(tree: str, url: str, count: int) -> float:
    """Events/s of `tree`'s Mesh (a child process; TREE_WORKER)."""
    proc = await asyncio.create_subprocess_exec(
        PY, "-c", TREE_WORKER, tree, url, str(count), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    return float(out.decode().strip().splitlines()[-1])


async def bench_rpc(tmp: Path, url: str, calls: int) -> tuple[float, float]:
    store = Store(tmp / "rpc")
    agent = FakeAgent(store, "bench-rpc")
    mesh = Mesh(agent, store, NatsOptions(servers=[url]))
    await mesh.start()
    while not mesh.ready:
        await asyncio.sleep(0.05)
    nc = await connect(NatsOptions(servers=[url]))
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await nc.request(rpc_subject("bench-rpc", "status"), b"", timeout=5)
        samples.append((time.perf_counter() - start) * 1000)
    await nc.close()
    await mesh.close()
    store.close()
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", default="1,10,50,100")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rpc-calls", type=int, default=1000)
    parser.add_argument("--agents", choices=["real", "fake"], default="real")
    parser.add_argument("--event-rounds", type=int, default=3)
    parser.add_argument("--before", default="", help="older trees to compare the outbox with")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="bench-mesh-"))
    server = start_nats(tmp)
    try:
        agents = ("reconciler.node.agent.Agent (own clone each, apps without processes)"
                  if args.agents == "real" else "tests/fake_agent.FakeAgent")
        print(f"nats-server {server.url}, {os.cpu_count()} CPUs, agents: {agents}")
        print("push -> wait returns (git push with the notify hook + `gitops-mesh wait`):")
        for n in [int(x) for x in args.nodes.split(",") if x]:
            times = await bench_push_wait(tmp, server.url, n, args.agents)
            print(f"  {n:4d} node(s): median {statistics.median(times):.2f}s  "
                  f"(rounds: {', '.join(f'{t:.2f}' for t in times)})")
        trees = [t for t in args.before.split(",") if t]
        if trees:
            trees.append(str(ROOT))  # this tree, in a child process like the older ones
        rates: dict[str, list[float]] = {"mesh": [], "floor": [], **{t: [] for t in trees}}
        for r in range(args.event_rounds):  # interleaved: the machine's drift hits all alike
            rate, floor = await bench_events(tmp, server.url, args.events, r)
            rates["mesh"].append(rate)
            rates["floor"].append(floor)
            for tree in trees:
                rates[tree].append(await bench_events_tree(tree, server.url, args.events))
        floor = statistics.median(rates["floor"])
        print(f"events outbox -> stream ({args.event_rounds} rounds, median; load average "
              f"{os.getloadavg()[0]:.1f}): NATS floor (raw pipelined js.publish_async) "
              f"{floor:,.0f} events/s")
        for label, values in rates.items():
            if label != "floor":
                name = "this Mesh, in this process" if label == "mesh" else label
                print(f"  {name}: {statistics.median(values):,.0f} events/s, ratio "
                      f"{statistics.median(values) / floor:.2f} (rounds: "
                      f"{', '.join(f'{v:,.0f}' for v in values)})")
        p50, p99 = await bench_rpc(tmp, server.url, args.rpc_calls)
        print(f"RPC status round trip: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
              f"({args.rpc_calls} calls)")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
