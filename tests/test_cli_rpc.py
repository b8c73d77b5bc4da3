"""suspend / resume / health / state / logs from the command line: real `gitops-mesh node`
agents, a real nats-server, the CLI as a subprocess; the logs RPC bounded and permission-checked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    NatsServer,
    eventually,
    eventually_async,
    make_spec_repo,
    start_nats,
    stop_processes,
)
from fake_agent import FakeAgent

from reconciler.mesh.link import Mesh, NatsOptions, connect
from reconciler.node.logtail import MAX_BYTES, MAX_LINES
from reconciler.node.store import Store

PY = sys.executable
SECRET = "rpc-s3cret-v4lue-17"
# prints a numbered line every 50 ms: the log to tail and follow
TICKER = ("import itertools, time\n"
          "for i in itertools.count():\n"
          "    print(f'tick {i}', flush=True)\n"
          "    time.sleep(0.05)\n")


def ticker_yaml() -> str:
    return f"""\
name: ticker
version: "1"
run:
  command: [{json.dumps(PY)}, "-c", {json.dumps(TICKER)}]
  env:
    API_KEY: {SECRET}
"""


def cli(url: str, *args: str, timeout: float = 60, **kw: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "reconciler", *args, "--nats", url, *(f"--{k.replace('_', '-')}={v}"
                                                        for k, v in kw.items())],
        capture_output=True, text=True, timeout=timeout,
        env={k: v for k, v in os.environ.items() if not k.startswith("GITOPS_MESH_")},
    )


@dataclass
class Fleet:
    url: str
    states: dict[str, Path]


@pytest.fixture(scope="module")
def fleet(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("rpc-fleet")
    repo = make_spec_repo(root / "specs", {"apps/ticker.yaml": ticker_yaml()})
    procs: dict[str, subprocess.Popen[bytes]] = {}
    states: dict[str, Path] = {}
    for node, role in (("rpc-edge", "edge"), ("rpc-gw", "gateway")):
        states[node] = root / node
        log = open(root / f"{node}.log", "wb")  # noqa: SIM115 - closed with the process
        procs[node] = subprocess.Popen(
            [PY, "-m", "reconciler", "node", "--repo", repo.url, "--node-id", node,
             "--label", f"role={role}", "--label", "fleet=rpc", "--state-dir",
             str(states[node]), "--nats", nats_server.url, "--interval", "1h",
             "--heartbeat", "1s", "--stop-apps-on-exit"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        def running() -> bool:
            for node, proc in procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"{node} exited: {(root / f'{node}.log').read_text()[-2000:]}")
            done = cli(nats_server.url, "status", "--json")
            rows = json.loads(done.stdout or "[]")
            return sum(r["node"] in procs and r["status"] == "synced" for r in rows) == 2
        eventually(running, timeout=60, what="both agents synced and in the KV")
        yield Fleet(nats_server.url, states)
    finally:
        stop_processes(*procs.values())


def test_suspend_and_resume_one_node_and_by_selector(fleet: Fleet) -> None:
    done = cli(fleet.url, "suspend", "--node", "rpc-edge", "--app", "ticker")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "rpc-edge  ticker suspended"
    state = json.loads(cli(fleet.url, "state", "--node", "rpc-edge", "--json").stdout)
    assert state["current"]["ticker"]["suspended"] is True

    done = cli(fleet.url, "suspend", "--selector", "fleet=rpc", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {"ok": True, "node": "rpc-edge", "app": None, "suspended": True},
        {"ok": True, "node": "rpc-gw", "app": None, "suspended": True},
    ]
    table = cli(fleet.url, "status")
    assert table.stdout.count("suspended") >= 2, table.stdout
    done = cli(fleet.url, "resume", "--selector", "fleet=rpc", "--selector", "role=edge")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "rpc-edge  resumed"
    for args in (("--node", "rpc-gw"), ("--node", "rpc-edge", "--app", "ticker")):
        assert cli(fleet.url, "resume", *args).returncode == 0
    state = json.loads(cli(fleet.url, "state", "--node", "rpc-edge", "--json").stdout)
    assert state["current"]["ticker"]["suspended"] is False


def test_each_failure_says_what_went_wrong(fleet: Fleet) -> None:
    done = cli(fleet.url, "suspend", "--node", "rpc-edge", "--app", "ghost")
    assert done.returncode == 1
    assert "unknown app 'ghost'; this node has: ticker" in done.stderr
    done = cli(fleet.url, "health", "--node", "nobody-here", "--json")
    assert done.returncode == 3
    assert json.loads(done.stdout)["error"] == "unreachable"
    assert "no node answered" in done.stderr and "nobody-here" in done.stderr
    done = cli(fleet.url, "resume", "--selector", "role")
    assert done.returncode == 2 and "bad selector" in done.stderr
    done = cli(fleet.url, "resume", "--selector", "role=submarine")
    assert done.returncode == 3 and "no node in gitops_nodes matches" in done.stderr
    done = cli("nats://127.0.0.1:1", "state", "--node", "rpc-edge")
    assert done.returncode == 3 and "cannot connect to NATS" in done.stderr
    done = cli(fleet.url, "logs", "--node", "rpc-edge", "--app", "ticker", "--lines", "5000")
    assert done.returncode == 2 and "--lines" in done.stderr


def test_health_and_state(fleet: Fleet) -> None:
    done = cli(fleet.url, "health", "--node", "rpc-gw", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"node": "rpc-gw", "health": {"ticker": "healthy"}}
    done = cli(fleet.url, "health", "--node", "rpc-gw", "--app", "ticker")
    assert done.stdout.split() == ["APP", "HEALTH", "ticker", "healthy"]
    done = cli(fleet.url, "state", "--node", "rpc-gw")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("node rpc-gw  desired revision ")
    assert "ticker" in done.stdout and "running" in done.stdout
    for fmt in ((), ("--json",)):
        assert SECRET not in cli(fleet.url, "state", "--node", "rpc-gw", *fmt).stdout


def test_logs_last_lines_and_follow(fleet: Fleet) -> None:
    done = cli(fleet.url, "logs", "--node", "rpc-edge", "--app", "ticker", "--lines", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("tick ") for line in lines)
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], numbers[0] + 3))

    follower = subprocess.Popen(
        [PY, "-m", "reconciler", "logs", "--node", "rpc-edge", "--app", "ticker", "--lines",
         "1", "--follow", "--json", "--nats", fleet.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        seen: list[int] = []
        while len(seen) < 15:  # the first answer, then lines the ticker writes meanwhile
            chunk = json.loads(follower.stdout.readline())
            assert chunk["node"] == "rpc-edge" and chunk["app"] == "ticker"
            seen += [int(line.split()[1]) for line in chunk["lines"]]
        # nothing twice, nothing left out: each answer starts where the last one ended
        assert seen == list(range(seen[0], seen[0] + len(seen)))
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 130
    finally:
        if follower.poll() is None:
            follower.kill()


def test_a_10_mb_log_answers_within_the_bounds(fleet: Fleet) -> None:
    log = fleet.states["rpc-gw"] / "logs" / "ticker.log"
    with log.open("ab") as f:  # appends, as the app's own writes do
        for _ in range(20):
            f.write(b"".join(b"%08d " % i + b"y" * 90 + b"\n" for i in range(5000)))
    assert log.stat().st_size > 10_000_000
    done = cli(fleet.url, "logs", "--node", "rpc-gw", "--app", "ticker", "--lines", "1000",
               "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["truncated"] is True
    assert 0 < len(answer["lines"]) <= MAX_LINES
    assert sum(len(line) + 1 for line in answer["lines"]) <= MAX_BYTES
    assert len(done.stdout.encode()) < 2 * MAX_BYTES


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Path]]:
    root = tmp_path_factory.mktemp("rpc-auth")
    out = root / "auth"
    subprocess.run([PY, "-m", "reconciler", "nats-config", "--node", "n1", "--node", "n2",
                    "--out", str(out)], check=True, capture_output=True)
    server = start_nats(root, 'include "auth/auth.conf"\n')
    yield server, out
    server.stop()


async def test_logs_need_rpc_rights_a_foreign_identity_is_denied(
    secured: tuple[NatsServer, Path], tmp_path: Path
) -> None:
    server, out = secured
    store = Store(tmp_path / "n1")
    agent = FakeAgent(store, "n1")
    (store.state_dir / "logs").mkdir()
    (store.state_dir / "logs" / "web.log").write_text("hello\nfrom web\n")
    from reconciler.core.status import AppStatus

    agent.apps["web"] = AppStatus(name="web", version="1", phase="running", health="healthy")
    mesh = Mesh(agent, store, NatsOptions(servers=[server.url],
                                          nkey_seed_file=str(out / "n1.nk")))
    await mesh.start()
    try:
        await eventually_async(lambda: _ready(mesh), what="n1 serves RPC")

        async def logs_as(identity: str) -> subprocess.CompletedProcess[str]:
            # in a thread: the agent answers on this test's event loop
            return await asyncio.to_thread(
                cli, server.url, "logs", "--node", "n1", "--app", "web", "--timeout", "20s",
                nats_nkey=str(out / f"{identity}.nk"))

        done = await logs_as("console")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "hello\nfrom web\n"
        for identity in ("n2", "observer"):
            done = await logs_as(identity)
            assert done.returncode == 4, (identity, done.stderr)
            assert "permission denied calling gitops.rpc.n1.logs" in done.stderr
        # the node's own reply bound: a huge `lines` is served as the cap
        nc = await connect(NatsOptions(servers=[server.url],
                                       nkey_seed_file=str(out / "console.nk")))
        try:
            reply = await nc.request("gitops.rpc.n1.logs",
                                     json.dumps({"app": "web", "lines": 10**9}).encode(), 5)
            assert json.loads(reply.data)["lines"] == ["hello", "from web"]
        finally:
            await nc.close()
    finally:
        await mesh.close()
        store.close()


async def _ready(mesh: Mesh) -> bool:
    return mesh.ready
