"""The mesh in production shape (prints numbers, asserts nothing).

    python bench/bench_mesh_cluster.py [--agents 100] [--before DIR] [--parts 1,2,3,4]

1. hook latency: the shipped post-receive hook -> the message at a subscriber, with the
   `notify` fast path (stdlib publisher) and with the old path (the whole CLI, then nats-py),
   same run.
2. a leader change while one agent's outbox streams events at a steady rate into a 3-server
   cluster (deploy/nats/cluster/nats.conf, R3 from nats-init): the server leading
   GITOPS_EVENTS is killed; the publishing stall, the time from the new leader's election to
   the first ack, events/s before / through / after, and lost or duplicated events.
3. a running `wait` whose server dies: time until it sees a status written after the kill.
4. push -> `wait` with N real agent processes (`gitops-mesh node`, apps without processes)
   against a single server and against the cluster, in the same run; per-agent start CPU.

`--before DIR`: a checkout of an older tree (e.g. `git archive 99e44d0 | tar -x -C DIR`);
parts 2 and 3 then also run its Mesh and its `wait` against the same cluster, for a
before/after comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import nats  # noqa: E402
import nats.errors  # noqa: E402
import psutil  # noqa: E402
from conftest import git, make_spec_repo, start_nats  # noqa: E402
from nats_cluster import Cluster, start_cluster, stream_leader  # noqa: E402

import reconciler  # noqa: E402

PY = sys.executable
HOOK = Path(reconciler.__file__).parent / "hooks" / "post-receive"
# The old `notify`: the whole CLI (parser, nats-py, asyncio) for one publish.
OLD_NOTIFY = """
import asyncio, json, sys
from reconciler.cli.main import parse_args
from reconciler.mesh.conn import NatsOptions, connect
args = parse_args(sys.argv[1:])
async def main():
    nc = await connect(NatsOptions.from_args(args), timeout=3.0)
    body = {"repo": args.repo, "branch": args.branch, "revision": args.revision}
    await nc.publish("gitops.source.changed", json.dumps(body).encode())
    await nc.flush(timeout=3)
    await nc.close()
asyncio.run(main())
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# ---- 1. hook latency -----------------------------------------------------------------------
async def bench_hook(tmp: Path, url: str, rounds: int = 15
                     ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall ms from the hook's start to the message at a subscriber, CPU ms of the hook)."""
    old_bin = tmp / "old-notify"
    old_bin.write_text(f"#!/bin/sh\nexec {PY} -c '{OLD_NOTIFY}' \"$@\"\n")
    old_bin.chmod(0o755)
    nc = await nats.connect(url)
    sub = await nc.subscribe("gitops.source.changed")
    await nc.flush()
    results: dict[str, list[float]] = {"fast path (gitops-mesh notify)": [],
                                       "old path (full CLI + nats-py)": []}
    cpu: dict[str, list[float]] = {label: [] for label in results}
    bins = [f"{PY} -m reconciler", str(old_bin)]
    for _ in range(rounds):
        for label, bin_ in zip(results, bins, strict=True):
            env = {**os.environ, "GITOPS_MESH_NATS": url, "GITOPS_MESH_BIN": bin_}
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                str(HOOK), stdin=asyncio.subprocess.PIPE, env=env, cwd=tmp)
            assert proc.stdin is not None
            proc.stdin.write(f"{'0' * 40} {'a' * 40} refs/heads/main\n".encode())
            proc.stdin.close()
            await sub.next_msg(timeout=10)
            results[label].append((time.perf_counter() - start) * 1000)
            await proc.wait()
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[label].append((after.ru_utime + after.ru_stime - used.ru_utime
                               - used.ru_stime) * 1000)
    await nc.close()
    return results, cpu


# ---- 2. a leader change under a steady event stream -----------------------------------------
WORKER = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
from datetime import UTC, datetime
from pathlib import Path
from fake_agent import FakeAgent
from reconciler.core.events import make_event
from reconciler.mesh.link import Mesh, NatsOptions
from reconciler.node.store import Store
import os, reconciler
assert os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] in ("", os.path.dirname(
    os.path.dirname(reconciler.__file__))), reconciler.__file__  # the tree asked for
urls, seed, state = sys.argv[2], sys.argv[3], Path(sys.argv[4])
rate, seconds = int(sys.argv[5]), float(sys.argv[6])
tuning = json.loads(sys.argv[7])  # Mesh keyword arguments (none for an older tree)
async def main():
    store = Store(state, outbox_max=10**7)
    agent = FakeAgent(store, "cl-1")
    mesh = Mesh(agent, store, NatsOptions(servers=urls.split(","), nkey_seed_file=seed),
                heartbeat=1.0, **tuning)
    await mesh.start()
    while not mesh.ready:
        await asyncio.sleep(0.01)
    start = time.monotonic()
    made = 0
    print(json.dumps({"ready": True, "port": mesh._nc.connected_url.port}), flush=True)
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * rate)
        with store.transaction():
            for _ in range(due - made):
                store.add_event(make_event("app.health-changed", "cl-1", datetime.now(UTC),
                                           app="web", message="bench"))
        made = due
        mesh._wake_publisher.set()
        print(json.dumps({"t": time.monotonic() - start, "made": made,
                          "acked": mesh.published}), flush=True)
        await asyncio.sleep(0.02)
    while store.outbox_stats()[0] and time.monotonic() - start < seconds + 30:
        print(json.dumps({"t": time.monotonic() - start, "made": made,
                          "acked": mesh.published}), flush=True)
        await asyncio.sleep(0.02)
    print(json.dumps({"done": True, "made": made, "acked": mesh.published,
                      "backlog": store.outbox_stats()[0]}), flush=True)
    await mesh.close()
asyncio.run(main())
"""


# The floor: nats-py itself, one js.publish at a time (0.25 s ack timeout), same rate and output.
RAW_WORKER = """
import asyncio, json, sys, time, uuid
import nats
urls, seed, rate, seconds = sys.argv[2], sys.argv[3], int(sys.argv[5]), float(sys.argv[6])
async def main():
    nc = await nats.connect(urls.split(","), nkeys_seed=seed, inbox_prefix=b"_INBOX.cl-1",
                            max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    js = nc.jetstream(timeout=0.25)
    start = time.monotonic()
    acked = made = 0
    print(json.dumps({"ready": True, "port": nc.connected_url.port}), flush=True)
    while time.monotonic() - start < seconds:
        try:
            await js.publish("gitops.events.cl-1.app.health-changed", b"{}",
                             headers={"Nats-Msg-Id": uuid.uuid4().hex})
            acked += 1
        except Exception:
            pass
        made += 1
        print(json.dumps({"t": time.monotonic() - start, "made": made, "acked": acked}),
              flush=True)
        await asyncio.sleep(1 / rate)
    print(json.dumps({"done": True, "made": made, "acked": acked, "backlog": 0}), flush=True)
    await nc.close()
asyncio.run(main())
"""


async def bench_leader_change(cluster: Cluster, tmp: Path, label: str, pythonpath: str | None,
                              tuning: dict[str, Any], rate: int = 500, seconds: float = 16.0,
                              kill_at: float = 3.0) -> dict[str, Any]:
    admin = await cluster.connect("admin")
    js = admin.jetstream()
    before = (await js.stream_info("GITOPS_EVENTS")).state.messages
    env = cluster.env("cl-1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    state = tmp / f"worker-{label}-{time.monotonic()}"
    proc = await asyncio.create_subprocess_exec(
        PY, "-c", RAW_WORKER if tuning.get("raw") else WORKER, str(ROOT / "tests"),
        cluster.urls, cluster.nkey("cl-1"), str(state), str(rate), str(seconds),
        json.dumps(tuning), stdout=asyncio.subprocess.PIPE, env=env,
        cwd=tmp)  # not this checkout: `python -c` puts the cwd before PYTHONPATH
    assert proc.stdout is not None
    samples: list[tuple[float, int, int]] = []
    killed_at = elected_at = None
    leader = new_leader = None
    final: dict[str, Any] = {}
    watch: asyncio.Task[None] | None = None

    async def watch_election() -> None:
        nonlocal elected_at, new_leader
        probe = await nats.connect([s.url for s in cluster.servers if s.name != leader],
                                   nkeys_seed=cluster.nkey("admin"))
        js = probe.jetstream(timeout=1.0)

        async def ask() -> None:
            nonlocal elected_at, new_leader
            with contextlib.suppress(Exception):  # no leader yet: a later ask answers
                info = await js.stream_info("GITOPS_EVENTS")
                if (elected_at is None and info.cluster and info.cluster.leader
                        and info.cluster.leader != leader):
                    elected_at, new_leader = time.monotonic(), info.cluster.leader

        # a request sent during the election is never answered: ask every 50 ms without
        # waiting for the earlier ones, so the election is seen within ~50 ms of the answer
        asks: list[asyncio.Task[None]] = []
        try:
            while elected_at is None:
                asks.append(asyncio.create_task(ask()))
                await asyncio.sleep(0.05)
        finally:
            await asyncio.gather(*asks, return_exceptions=True)
            await probe.close()

    t0 = None
    publisher_port = None
    async for raw in proc.stdout:
        line = json.loads(raw)
        if line.get("ready"):
            t0 = time.monotonic()
            publisher_port = line.get("port")
            continue
        if line.get("done"):
            final = line
            break
        samples.append((line["t"], line["made"], line["acked"]))
        if killed_at is None and line["t"] >= kill_at:
            leader = await stream_leader(admin, "GITOPS_EVENTS")
            cluster.server(leader).kill()
            killed_at = time.monotonic()
            watch = asyncio.create_task(watch_election())
    await proc.wait()
    if watch is not None:
        await asyncio.wait_for(watch, 30)
    await admin.close()
    assert t0 is not None and killed_at is not None and leader is not None
    cluster.server(leader).start()
    admin = await cluster.connect("admin")
    after = None
    for _ in range(60):  # the restarted server rejoins; under load an answer may take a while
        try:
            after = (await admin.jetstream().stream_info("GITOPS_EVENTS")).state.messages
            break
        except (TimeoutError, nats.errors.Error):
            await asyncio.sleep(0.5)
    await admin.close()
    assert after is not None, "the stream did not answer after the restart"
    kill_t = killed_at - t0
    elected_t = (elected_at - t0) if elected_at else None
    # the stall: the longest spell without a new ack that begins around the kill
    increases = [t for (_pt, _pm, pa), (t, _m, a) in itertools.pairwise(samples) if a > pa]
    gaps = [(b - a, b) for a, b in itertools.pairwise(increases)
            if b > kill_t and a >= kill_t - 0.5]
    stall, resumed = max(gaps) if gaps else (None, None)
    return {
        "label": label, "leader": leader, "new_leader": new_leader,
        "publisher_on_killed": publisher_port == cluster.server(leader).port,
        "election_s": (elected_t - kill_t) if elected_t else None,
        "stall_s": stall,
        "after_election_s": (resumed - elected_t) if resumed and elected_t else None,
        "rate_before": _rate(samples, 0.5, kill_t),
        "rate_after": _rate(samples, (resumed or seconds) + 0.5, seconds),
        "made": final.get("made"), "acked": final.get("acked"), "backlog": final.get("backlog"),
        "stored": after - before,
    }


def _rate(samples: list[tuple[float, int, int]], start: float, end: float) -> float:
    inside = [(t, a) for t, _m, a in samples if start <= t <= end]
    if len(inside) < 2:
        return 0.0
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


# ---- 3. a running wait whose server dies ---------------------------------------------------
async def bench_wait_failover(cluster: Cluster, label: str, pythonpath: str | None,
                              revision: str) -> dict[str, Any]:
    env = cluster.env("observer")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    async def quiet(_exc: Exception) -> None:  # the writer rides the failover: no noise
        pass

    writer = await nats.connect([s.url for s in cluster.servers], nkeys_seed=cluster.nkey("cl-2"),
                                inbox_prefix=b"_INBOX.cl-2", max_reconnect_attempts=-1,
                                reconnect_time_wait=0.1, error_cb=quiet)
    js = writer.jetstream(timeout=1)

    def status(rev: str) -> bytes:
        return json.dumps({"node": "cl-2", "revision": rev, "status": "synced",
                           "updated_at": datetime.now(UTC).isoformat(),
                           "heartbeat_interval_s": 1.0}).encode()

    await _when_replicated(cluster)  # the server killed last trial is back and current
    await js.publish("$KV.gitops_nodes.cl-2", status("0" * 40))
    proc = subprocess.Popen(
        [PY, "-m", "reconciler", "wait", "--nats", cluster.urls, "--node", "cl-2",
         "--revision", revision, "--timeout", "60s"], env=env, cwd=cluster.root,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ports = {s.port: s for s in cluster.servers}
    server = None
    deadline = time.monotonic() + 20
    while server is None and time.monotonic() < deadline:
        for conn in psutil.Process(proc.pid).net_connections():
            if conn.raddr and conn.raddr.port in ports and conn.status == "ESTABLISHED":
                server = ports[conn.raddr.port]
        await asyncio.sleep(0.05)
    assert server is not None, "wait never connected"
    await asyncio.sleep(1.0)  # watching
    admin = await cluster.connect("admin")
    kv_leader = await stream_leader(admin, "KV_gitops_nodes")
    await admin.close()
    server.kill()
    killed = time.monotonic()
    written = None
    while proc.poll() is None and time.monotonic() - killed < 60:
        with_retry = time.monotonic()
        with contextlib.suppress(Exception):  # the writer rides the same failover
            await js.publish("$KV.gitops_nodes.cl-2", status(revision))
            written = written or time.monotonic() - killed
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - with_retry)))
    proc.wait(60)
    seen = time.monotonic() - killed
    _out, err = proc.communicate()
    server.start()
    await writer.close()
    return {"label": label, "seconds": seen, "code": proc.returncode, "written": written,
            "killed": server.name, "kv_leader_killed": kv_leader == server.name,
            "traceback": "Traceback" in err}


async def _when_replicated(cluster: Cluster, timeout: float = 60.0) -> None:
    """Until the status bucket has a leader and every replica is current again."""
    admin = await cluster.connect("admin")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                info = await admin.jetstream(timeout=1).stream_info("KV_gitops_nodes")
                peers = info.cluster.replicas or [] if info.cluster else []
                if info.cluster and info.cluster.leader and len(peers) == 2 and all(
                        p.current for p in peers):
                    return
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


# ---- 4. push -> wait with N agent processes -------------------------------------------------
async def bench_fleet(tmp: Path, urls: str, n: int, env_for: Any, label: str,
                      rounds: int = 2) -> dict[str, Any]:
    repo = make_spec_repo(tmp / f"specs-{label}", {"apps/web.yaml": 'name: web\nversion: "0"\n'})
    shutil.copy(HOOK, repo.bare / "hooks" / "post-receive")
    procs = []
    start = time.monotonic()
    for i in range(n):
        node = f"f-{i}"
        log = open(tmp / f"{label}-{node}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(
            [PY, "-m", "reconciler", "node", "--repo", repo.url, "--node-id", node,
             "--label", f"fleet={label}", "--state-dir", str(tmp / label / node),
             "--nats", urls, "--interval", "1h", "--heartbeat", "10s"],
            stdout=log, stderr=subprocess.STDOUT, env=env_for(node)))
    observer = env_for("observer")
    reported = None
    while time.monotonic() - start < 600:
        done = subprocess.run([PY, "-m", "reconciler", "wait", "--nats", urls, "--revision",
                               repo.head(), "--selector", f"fleet={label}", "--timeout", "5s"],
                              env=observer, capture_output=True, text=True)
        if done.returncode == 0 and f"synced on {n} node" in done.stdout:
            reported = time.monotonic() - start
            break
    cpu = [sum(psutil.Process(p.pid).cpu_times()[:2]) for p in procs if p.poll() is None]
    times = []
    notifier = env_for("notifier")
    notifier.update(GITOPS_MESH_NATS=urls, GITOPS_MESH_BIN=f"{PY} -m reconciler")
    for r in range(1, rounds + 1):
        repo.write("apps/web.yaml", f'name: web\nversion: "{r}"\n')
        git(repo.work, "add", "-A")
        git(repo.work, "commit", "-q", "-m", f"round {r}")
        sha = repo.head()
        t = time.perf_counter()
        git(repo.work, "push", "-q", "origin", "HEAD:main", env=notifier)
        done = subprocess.run([PY, "-m", "reconciler", "wait", "--nats", urls, "--revision",
                               sha, "--selector", f"fleet={label}", "--timeout", "120s"],
                              env=observer, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if done.returncode:
            print(f"  ! {label}: wait exited {done.returncode}: {done.stderr[-300:]}")
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    return {"label": label, "n": n, "all_synced_s": reported, "times": times,
            "cpu_median": statistics.median(cpu) if cpu else None}


def plain_env(_identity: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GITOPS_MESH_")}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--before", default=None, help="an older tree to compare with")
    parser.add_argument("--parts", type=lambda v: {int(x) for x in v.split(",")},
                        default={1, 2, 3, 4}, help="which parts to run (default 1,2,3,4)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--ack-timeouts", type=lambda v: [float(x) for x in v.split(",") if x],
                        default=[], help="also run the Mesh with these ack timeouts")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    (tmp / "single").mkdir()
    single = start_nats(tmp / "single")
    cluster = await asyncio.to_thread(start_cluster, tmp / "cluster", [
        "cl-1", "cl-2", *(f"f-{i}" for i in range(args.agents))])
    try:
        init = cluster.gitops("admin", "nats-init")
        print("nats-init:", " | ".join(init.stdout.splitlines()))

        if 1 in args.parts:
            hook, cpu = await bench_hook(tmp, single.url)
            print("1. hook -> message on the wire (ms, 15 pushes each, interleaved):")
            for label, ms in hook.items():
                print(f"   {label:32s} wall p50 {statistics.median(ms):6.1f}  p90 "
                      f"{pct(ms, 0.9):6.1f}; CPU of the hook p50 "
                      f"{statistics.median(cpu[label]):6.1f}")

        trees: list[tuple[str, str | None]] = [("now", None)]
        if args.before:
            trees.insert(0, ("before", args.before))
        variants: list[tuple[str, str | None, dict[str, Any]]] = [
            (label, path, {}) for label, path in trees]
        variants += [(f"ack {t:g}s", None, {"ack_timeout": t}) for t in args.ack_timeouts]
        variants.append(("nats-py", None, {"raw": True}))  # the floor
        print(f"2. stream leader killed while one agent publishes 500 events/s "
              f"({args.trials} trials each):")
        for label, path, tuning in variants if 2 in args.parts else []:
            for _ in range(args.trials):
                r = await bench_leader_change(cluster, tmp, label, path, tuning)
                print(f"   {label:8s} {r['leader']} -> {r['new_leader']}: election "
                      f"{_s(r['election_s'])}, no acks for {_s(r['stall_s'])} "
                      f"(flowing {_s(r['after_election_s'])} after the election); events/s "
                      f"before {r['rate_before']:.0f}, catching up {r['rate_after']:.0f}; "
                      f"made {r['made']}, acked {r['acked']}, stored {r['stored']}; "
                      f"the publisher was on the killed server: {r['publisher_on_killed']}")
        print("3. a running `wait` whose server is killed: time until it returns (a status "
              "written after the kill):")
        for label, path in trees if 3 in args.parts else []:
            for i in range(args.trials):
                r = await bench_wait_failover(cluster, label, path, f"{label[0]}{i}" * 20)
                after_write = r["seconds"] - r["written"] if r["written"] else None
                print(f"   {label:6s} returned {r['seconds']:.2f} s after the kill, "
                      f"{_s(after_write)} after the first status write acked "
                      f"({_s(r['written'])}); exit {r['code']}, killed "
                      f"{r['killed']} (KV leader: {r['kv_leader_killed']}), traceback "
                      f"{r['traceback']}")
        if 4 in args.parts:
            print(f"4. push -> wait with {args.agents} agent processes:")
            for where, urls, env_for in (("single", single.url, plain_env),
                                         ("cluster", cluster.urls, cluster.env)):
                r = await bench_fleet(tmp, urls, args.agents, env_for, where)
                print(f"   {where:7s}: all {r['n']} started and synced in "
                      f"{_s(r['all_synced_s'])}; per-agent CPU until then (median) "
                      f"{_s(r['cpu_median'])}; push -> wait "
                      f"{', '.join(f'{t:.2f} s' for t in r['times'])}")
    finally:
        cluster.stop()
        single.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


if __name__ == "__main__":
    asyncio.run(main())
