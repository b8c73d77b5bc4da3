"""Benchmark of the process runtime: spawn floor, 20 apps serial vs parallel, start-to-healthy.

Run: PATH=/tmp/gmvenv/bin:$PATH python bench/bench_runtime.py [--apps 20] [--rounds 30]
Prints numbers only; nothing here asserts timing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from reconciler.core.spec import HealthSpec
from reconciler.node.health import wait_healthy
from reconciler.node.runtimes.base import LaunchSpec, ProcessRecord
from reconciler.node.runtimes.process import ProcessRuntime


class Quiet:
    def on_started(self, record: ProcessRecord, restarted: bool) -> None: ...

    def on_exited(self, name: str, returncode: int | None, restart_in: float | None) -> None: ...

    def on_crash_loop(self, name: str, message: str) -> None: ...


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(root: Path, name: str, argv: list[str]) -> LaunchSpec:
    return LaunchSpec(
        name=name, version="1", argv=tuple(argv), env={"PATH": os.environ["PATH"]},
        workdir=root, log_dir=root / "logs", stop_timeout=5.0,
    )


def ms(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"p50 {statistics.median(ordered) * 1000:7.2f} ms  p95 {p95 * 1000:7.2f} ms  "
            f"max {ordered[-1] * 1000:7.2f} ms  (n={len(ordered)})")


async def timed(step: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await step()
    return time.perf_counter() - started


async def spawn_floor(root: Path, rounds: int) -> None:
    runtime = ProcessRuntime(Quiet())
    starts, stops = [], []
    for index in range(rounds):
        app = launch(root, f"floor-{index}", ["/bin/sleep", "60"])
        starts.append(await timed(lambda app=app: runtime.start(app)))  # type: ignore[misc]
        stops.append(await timed(lambda app=app: runtime.stop(app.name)))  # type: ignore[misc]
    print(f"spawn floor  start() of /bin/sleep      {ms(starts)}")
    print(f"             stop() (SIGTERM, group)    {ms(stops)}")
    await runtime.close(stop_apps=True)


async def many(root: Path, apps: int, parallel: bool, healthy: bool) -> float:
    runtime = ProcessRuntime(Quiet())
    ports = [free_port() for _ in range(apps)]
    specs = [
        launch(root, f"app-{i}", [sys.executable, "-m", "http.server", str(port),
                                   "--bind", "127.0.0.1"] if healthy else ["/bin/sleep", "60"])
        for i, port in enumerate(ports)
    ]

    async def one(spec: LaunchSpec, port: int) -> None:
        record = await runtime.start(spec)
        if healthy:
            def is_alive(name: str = spec.name) -> bool:
                stats = runtime.stats(name)
                return stats is not None and stats.state == "running"

            result = await wait_healthy(
                HealthSpec.model_validate({"tcp": {"port": port}}), cwd=root, env=spec.env,
                is_alive=is_alive, timeout=30,
            )
            assert result.ok, (record, result.message)

    started = time.perf_counter()
    if parallel:
        await asyncio.gather(*(one(spec, port) for spec, port in zip(specs, ports, strict=True)))
    else:
        for spec, port in zip(specs, ports, strict=True):
            await one(spec, port)
    elapsed = time.perf_counter() - started
    await runtime.close(stop_apps=True)
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--apps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"cpus {os.cpu_count()}  python {sys.version.split()[0]}")
        await spawn_floor(root, args.rounds)
        for healthy in (False, True):
            what = "start + wait_healthy (http.server, tcp)" if healthy else "start (/bin/sleep)"
            serial = await many(root, args.apps, parallel=False, healthy=healthy)
            parallel = await many(root, args.apps, parallel=True, healthy=healthy)
            print(f"{args.apps} apps  {what:40s} serial {serial * 1000:8.1f} ms  "
                  f"parallel {parallel * 1000:8.1f} ms  speed-up x{serial / parallel:.1f}")
        healthy_one = [await many(root, 1, parallel=False, healthy=True) for _ in range(10)]
        print(f"1 app   start + wait_healthy (http.server)  {ms(healthy_one)}")


if __name__ == "__main__":
    asyncio.run(main())
