"""Console benchmark: 1,000 simulated nodes writing status and events into a real nats-server.

Prints the console's RSS, event ingestion rate (replay at start and live) and /api/fleet
latency p50/p99 (idle and while events stream in). Targets: >= 5,000 events/s ingested,
<= 100 ms p99 for the fleet view.

`--render 1000,5000` (issue #12) instead compares fleet sizes in one run: the overview's
first render in a real Chromium, /api/fleet p99, the page's JS heap (CDP
Performance.getMetrics), and how long a status change takes to show in the open page.
Target: 5,000 nodes render in <= 1.5 s and stay live.

    PATH=/tmp/gmvenv/bin:$PATH python bench/bench_console.py [--nodes 1000] [--events 100000]
    PATH=/tmp/gmvenv/bin:$PATH python bench/bench_console.py --render 1000,5000
    PATH=/tmp/gmvenv/bin:$PATH python bench/bench_console.py --before /tmp/old-main

`--before DIR` runs the same scenario (a fresh nats-server each) with the console of an
older checkout too, alternating before/now `--rounds` times, to compare in one run; the
older tree must read today's status and event shapes. The console's CPU seconds are
printed beside the rates: on a loaded machine they move less than wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # sim.py

import sim

from reconciler.core.events import Event, make_event
from tests.conftest import free_port, start_nats

TYPES = ["reconcile.started", "app.deployed", "app.health-changed", "reconcile.finished"]


def make_events(nodes: int, count: int, start: datetime, revision: str) -> list[Event]:
    out = []
    for i in range(count):
        node = f"node-{i % nodes:04d}"
        typ = TYPES[(i // nodes) % len(TYPES)]
        out.append(make_event(
            typ, node, start + timedelta(milliseconds=i), revision=revision, app="web",
            version="1.0.0", outcome="success" if typ == "reconcile.finished" else None,
            duration_ms=800.0 + i % 400 if typ == "reconcile.finished" else None))
    return out


async def publish(url: str, events: list[Event], publishers: int = 4) -> float:
    """Publish from several connections at once (nodes publish in parallel); seconds taken."""
    conns = [await sim.connect(url) for _ in range(publishers)]
    began = time.perf_counter()
    await asyncio.gather(*(sim.publish_many(js, events[i::publishers])
                           for i, (_, js, _) in enumerate(conns)))
    took = time.perf_counter() - began
    for nc, _, _ in conns:
        await nc.close()
    return took


async def put_statuses(url: str, nodes: int) -> None:
    nc, _, kv = await sim.connect(url)
    roles = ["edge", "gateway", "db", "edge"]
    for i in range(nodes):
        state = "failed" if i % 97 == 0 else "progressing" if i % 31 == 0 else "synced"
        await sim.put_status(kv, sim.node_status(
            f"node-{i:04d}", state, labels={"role": roles[i % 4], "site": f"s{i % 7}"},
            heartbeat_interval_s=600.0))
    await nc.close()


def wait_for(client: httpx.Client, events: int, nodes: int, timeout: float = 300,
             first: list[float] | None = None, proc: psutil.Process | None = None) -> float:
    """Time when the console has `events` events and `nodes` nodes; the time the first
    event was seen is appended to `first` (then the CPU seconds of `proc` by then)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            health = client.get("/api/health").json()
            if first is not None and not first and health["events_total"] > 0:
                first.append(time.perf_counter())
                if proc is not None:
                    first.append(sum(proc.cpu_times()[:2]))
            if health["events_total"] >= events and health["nodes"] >= nodes:
                return time.perf_counter()
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"console did not ingest {events} events within {timeout}s")


def latency(client: httpx.Client, n: int) -> tuple[float, float, int]:
    samples = []
    size = 0
    for _ in range(n):
        began = time.perf_counter()
        res = client.get("/api/fleet")
        samples.append((time.perf_counter() - began) * 1000)
        size = len(res.content)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1], size


async def watch_streams(url: str, browsers: int, seconds: float) -> tuple[float, float]:
    """`browsers` live overview streams for `seconds`: (pushes/s, KiB/s of updates after
    the first full view) per stream."""
    pushes = [0] * browsers
    sizes = [0] * browsers

    async def one(i: int, client: httpx.AsyncClient) -> None:
        async with client.stream("GET", "/api/stream/overview") as res:
            async for line in res.aiter_lines():
                if line.startswith("data: "):
                    if pushes[i]:  # the first push is the whole view; count the updates
                        sizes[i] += len(line)
                    pushes[i] += 1

    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        tasks = [asyncio.create_task(one(i, client)) for i in range(browsers)]
        await asyncio.sleep(seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return sum(pushes) / browsers / seconds, sum(sizes) / browsers / seconds / 1024


async def render_one(url: str, nats_url: str, nodes: int, requests: int) -> dict[str, float]:
    """Overview render, /api/fleet p99, page heap and live update delay for one fleet size."""
    from playwright.async_api import async_playwright

    client = httpx.Client(base_url=url, timeout=30)
    wait_for(client, 0, nodes)
    p50, p99, size = latency(client, requests)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_console_browser import ARGS, CHROMIUM

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        renders = []
        for _ in range(3):  # the median of three fresh pages (the first warms Chromium up)
            page = await browser.new_page(viewport={"width": 1360, "height": 900})
            began = time.perf_counter()
            await page.goto(f"{url}/")
            await page.wait_for_function(
                f"document.querySelectorAll('.card').length >= Math.min(100, {nodes})")
            renders.append(time.perf_counter() - began)
        render_s = statistics.median(renders)
        cdp = await page.context.new_cdp_session(page)
        await cdp.send("Performance.enable")
        await page.wait_for_function("document.querySelector('#live').textContent === 'live'")
        metrics = {m["name"]: m["value"]
                   for m in (await cdp.send("Performance.getMetrics"))["metrics"]}
        # stays live: a node turns failed; unhealthy first puts it on the first page
        nc, _, kv = await sim.connect(nats_url)
        changed = time.perf_counter()
        await sim.put_status(kv, sim.node_status(f"node-{nodes - 1:04d}", "failed",
                                                 labels={"role": "edge", "site": "s1"},
                                                 heartbeat_interval_s=600.0))
        await page.wait_for_selector(
            f'.card[data-node="node-{nodes - 1:04d}"][data-status="failed"]')
        live_s = time.perf_counter() - changed
        await nc.close()
        await browser.close()
    return {"render_s": render_s, "p50_ms": p50, "p99_ms": p99, "fleet_kib": size / 1024,
            "heap_mib": metrics.get("JSHeapUsedSize", 0) / 2**20,
            "dom_nodes": metrics.get("Nodes", 0), "live_s": live_s}


def render_bench(sizes: list[int], requests: int) -> int:
    results = {}
    for nodes in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="bench-console-render-"))
        server = start_nats(tmp)
        console = None
        try:
            asyncio.run(put_statuses(server.url, nodes))
            port = free_port()
            console = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "console", "--nats", server.url, "--port",
                 str(port), "--read-only"], stdout=subprocess.DEVNULL)
            results[nodes] = asyncio.run(render_one(f"http://127.0.0.1:{port}", server.url,
                                                    nodes, requests))
        finally:
            if console is not None:
                console.terminate()
                console.wait(10)
            server.stop()
    print(f"{'nodes':>6} {'first render':>13} {'/api/fleet p50/p99':>19} {'size':>9} "
          f"{'JS heap':>9} {'DOM nodes':>10} {'live update':>12}")
    for nodes, r in results.items():
        print(f"{nodes:>6} {r['render_s'] * 1000:>10.0f} ms {r['p50_ms']:>7.1f} / "
              f"{r['p99_ms']:>5.1f} ms "
              f"{r['fleet_kib']:>5.0f} KiB {r['heap_mib']:>5.1f} MiB {r['dom_nodes']:>10.0f} "
              f"{r['live_s'] * 1000:>9.0f} ms")
    biggest = results[max(results)]
    print(f"target ({max(results)} nodes render <= 1.5 s and stay live):",
          "met" if biggest["render_s"] <= 1.5 and biggest["live_s"] < 5 else "MISSED")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--browsers", type=int, default=20,
                        help="live overview streams open while events stream in")
    parser.add_argument("--render", metavar="SIZES",
                        help="compare fleet sizes, e.g. 1000,5000: overview render in "
                             "Chromium, /api/fleet p99, page memory, live update")
    parser.add_argument("--before", metavar="DIR",
                        help="also run the console of an older checkout (e.g. `git archive "
                             "main | tar -x -C DIR`), alternating with this tree's")
    parser.add_argument("--rounds", type=int, default=2,
                        help="with --before: how many before/now pairs")
    parser.add_argument("--latency-only", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--streams-only", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        return render_bench([int(n) for n in args.render.split(",")], args.requests)
    if args.streams_only:
        rate, kib = asyncio.run(watch_streams(args.streams_only, args.browsers, 5.0))
        print(rate, kib)
        return 0
    if args.latency_only:
        time.sleep(0.5)  # let the publishers get going
        p50, p99, size = latency(httpx.Client(base_url=args.latency_only, timeout=30),
                                 args.requests)
        print(p50, p99, size)
        return 0
    trees: list[tuple[str, str | None]] = [("now", None)]
    if args.before:
        trees = [("before", args.before), ("now", None)] * args.rounds
    results = [(label, scenario(args, tree)) for label, tree in trees]
    print(f"nodes: {args.nodes}, events per phase: {args.events}, events kept: 5000")
    for label, r in results:
        if args.before:
            print(f"--- {label} ({args.before if label == 'before' else 'this tree'})")
        report(args, r)
    return 0


def scenario(args: argparse.Namespace, tree: str | None) -> dict[str, Any]:
    """One run against a fresh nats-server: replay at start, latency, live ingestion with
    streams open. `tree`: run the console of that checkout instead of this one."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-console-"))
    server = start_nats(tmp)
    console = None
    env = {**os.environ, "PYTHONPATH": tree} if tree else None
    try:
        now = datetime.now(UTC)
        asyncio.run(put_statuses(server.url, args.nodes))
        replay = make_events(args.nodes, args.events, now - timedelta(minutes=30), "a" * 40)
        asyncio.run(publish(server.url, replay))

        port = free_port()
        began = time.perf_counter()
        console = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "console", "--nats", server.url, "--port",
             str(port), "--read-only"], stdout=subprocess.DEVNULL, env=env, cwd=tree)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        first: list[float] = []
        proc = psutil.Process(console.pid)
        done = wait_for(client, args.events, args.nodes, first=first, proc=proc)
        cpu_s = sum(proc.cpu_times()[:2])
        r: dict[str, Any] = {
            "replay_rate": args.events / (done - began),
            "replay_only": args.events / (done - first[0]) if first and done > first[0] else 0.0,
            # CPU of the console process from its start, and from the first event on:
            # steadier than wall time on a loaded machine
            "replay_cpu_s": cpu_s,
            "replay_cpu_after_first_s": cpu_s - first[1] if len(first) > 1 else cpu_s,
            "rss_replay": proc.memory_info().rss,
        }
        r["p50"], r["p99"], r["size"] = latency(client, args.requests)

        live = make_events(args.nodes, args.events, now, "b" * 40)

        async def live_run() -> tuple[float, float]:
            loop = asyncio.get_running_loop()
            pub_began = time.perf_counter()
            waiter = loop.run_in_executor(None, wait_for, client, 2 * args.events, args.nodes)
            pub_took = await publish(server.url, live)
            ingested_at = await waiter
            return pub_took, ingested_at - pub_began

        # fleet latency while events stream in, from a separate process (its own GIL)
        async def loaded_latency() -> tuple[float, float, int]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--latency-only", f"http://127.0.0.1:{port}",
                "--requests", str(args.requests // 2), stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            lp50, lp99, size = out.decode().split()
            return float(lp50), float(lp99), int(size)

        # browsers watching the overview meanwhile, from another process
        async def streams() -> tuple[float, float]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--streams-only", f"http://127.0.0.1:{port}",
                "--browsers", str(args.browsers), stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            rate, kib = out.decode().split()
            return float(rate), float(kib)

        async def live_and_latency() -> Any:
            return await asyncio.gather(live_run(), loaded_latency(), streams())

        cpu_before_live = sum(proc.cpu_times()[:2])
        (pub_took, ingest_took), (r["lp50"], r["lp99"], _), (r["push_rate"], r["push_kib"]) = (
            asyncio.run(live_and_latency()))
        r["live_cpu_s"] = sum(proc.cpu_times()[:2]) - cpu_before_live
        r["pub_rate"], r["ingest_rate"] = args.events / pub_took, args.events / ingest_took
        r["rss_live"] = proc.memory_info().rss
        r["health"] = client.get("/api/health").json()
        return r
    finally:
        if console is not None:
            console.terminate()
            console.wait(10)
        server.stop()


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    health = r["health"]
    exact = health["events_total"] == 2 * args.events
    print(f"replay at start: {r['replay_rate']:,.0f} events/s from process start to all "
          f"{args.events} applied ({r['replay_only']:,.0f} events/s once the first arrived; "
          f"console CPU {r['replay_cpu_s']:.2f} s from its start, "
          f"{r['replay_cpu_after_first_s']:.2f} s from the first event on)")
    print(f"live: publishers {r['pub_rate']:,.0f} events/s, console ingested "
          f"{r['ingest_rate']:,.0f} events/s (end to end; console CPU {r['live_cpu_s']:.2f} s, "
          "streams and requests included)")
    print(f"console RSS: {r['rss_replay'] / 2**20:.1f} MiB after replay, "
          f"{r['rss_live'] / 2**20:.1f} MiB after {2 * args.events} events")
    print(f"/api/fleet ({r['size'] / 1024:.0f} KiB): p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms "
          f"idle; p50 {r['lp50']:.1f} ms, p99 {r['lp99']:.1f} ms while ingesting")
    print(f"{args.browsers} live overview streams while ingesting: {r['push_rate']:.1f} pushes/s "
          f"and {r['push_kib']:.1f} KiB/s of updates each (coalesced: at most 4 pushes/s)")
    print(f"events applied: {health['events_total']} "
          f"({'exactly once' if exact else 'NOT exactly once'}), rejected {health['rejected']}")
    ok = exact and (r["replay_rate"] >= 5000 and r["ingest_rate"] >= 5000 and r["p99"] <= 100)
    print("targets (>= 5,000 events/s, <= 100 ms p99 idle):", "met" if ok else "MISSED")


if __name__ == "__main__":
    sys.exit(main())
