"""`gitops-mesh node` / `status` as real subprocesses: kill -9 mid-upgrade, --once, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import reconciler
from reconciler.cli.node_cmds import local_status
from reconciler.node.store import read_snapshot
from tests.conftest import NatsServer, SpecRepo, eventually, free_port, make_spec_repo
from tests.test_agent import APP_SCRIPT, SECRET, answers, app_pids, app_yaml


@pytest.fixture
def app_script(tmp_path: Path) -> Path:
    path = tmp_path / "app.py"
    path.write_text(APP_SCRIPT)
    return path


@pytest.fixture
def cleanup_node(tmp_path: Path) -> Iterator[list[str]]:
    """Node ids whose app processes (of agents with state under tmp_path) are killed after
    the test (the agent leaves them)."""
    nodes: list[str] = []
    yield nodes
    for node in nodes:
        for pids in app_pids(node, tmp_path).values():
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)


def node_cmd(repo: SpecRepo, node: str, state: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "reconciler", "node", "--repo", repo.url, "--node-id", node,
            "--state-dir", str(state), "--interval", "300ms", "--heartbeat", "1s", *extra]


def start_node(repo: SpecRepo, node: str, state: Path, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(node_cmd(repo, node, state), stdout=out, stderr=out)


def test_kill_9_mid_upgrade_converges_without_duplicates_or_orphans(
    tmp_path: Path, app_script: Path, cleanup_node: list[str]
) -> None:
    cleanup_node.append("k1")
    repo = make_spec_repo(tmp_path / "specs")
    state, log = tmp_path / "state", tmp_path / "agent.log"
    port, other = free_port(), free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    repo.write("apps/other.yaml", app_yaml(app_script, "other", "1", other))
    repo.commit_and_push()
    agent = start_node(repo, "k1", state, log)
    try:
        eventually(lambda: answers(port) == "1 k1" and answers(other) == "1 k1",
                   what="v1 running")
        # v2 takes 2 s to listen: the agent is killed while it waits for its health
        repo.write("apps/web.yaml", app_yaml(app_script, "web", "2", port, "slow2",
                                             start_timeout="20s"))
        repo.commit_and_push("web 2")

        def upgrading() -> bool:
            snap = read_snapshot(state)
            assert snap is not None
            web = snap.apps["web"]
            return web.phase == "upgrading" and web.proc_version == "2"

        eventually(upgrading, what="upgrade in progress")
    finally:
        agent.kill()
        agent.wait()
    assert agent.returncode == -signal.SIGKILL
    other_pids = app_pids("k1", state)["other"]

    agent = start_node(repo, "k1", state, log)
    try:
        def converged() -> bool:
            status = local_status(state)
            assert status is not None
            web = {a.name: a for a in status.apps}["web"]
            assert (web.version, web.phase, web.health) == ("2", "running", "healthy")
            return answers(port) == "2 k1"

        eventually(converged, timeout=20, what="web 2 running after the restart")
        snap = read_snapshot(state)
        assert snap is not None
        # one process per app, each the recorded one: no duplicates, no orphans
        assert app_pids("k1", state) == {"web": [snap.apps["web"].pid],
                                  "other": [snap.apps["other"].pid]}
        assert app_pids("k1", state)["other"] == other_pids  # adopted, not restarted
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
    # SIGTERM leaves the apps running for the next agent
    assert answers(port) == "2 k1" and answers(other) == "1 k1"
    assert SECRET not in log.read_text()


def test_once_and_status(
    tmp_path: Path, app_script: Path, cleanup_node: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from reconciler.cli.main import parse_args
    from reconciler.cli.node_cmds import run_status
    from reconciler.cli.plan_cmds import run_plan

    def command(run: Callable[[Any], int], *argv: str) -> str:
        capsys.readouterr()
        assert run(parse_args(list(argv))) == 0
        return capsys.readouterr().out

    cleanup_node.append("o1")
    repo = make_spec_repo(tmp_path / "specs")
    state = tmp_path / "state"
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    rev = repo.commit_and_push()
    run = subprocess.run(node_cmd(repo, "o1", state, "--once", "--label", "role=edge"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"o1: synced at {rev[:12]}")
    assert answers(port) == "1 o1"  # --once leaves the app running

    status = json.loads(command(run_status, "status", "--state-dir", str(state), "--json"))
    assert {k: status[k] for k in ("node", "labels", "revision", "status")} == {
        "node": "o1", "labels": {"role": "edge"}, "revision": rev, "status": "synced"}
    assert [(a["name"], a["version"], a["phase"], a["health"]) for a in status["apps"]] == [
        ("web", "1", "running", "healthy")]
    assert status["apps"][0]["pid"] == app_pids("o1", state)["web"][0]

    # what the agent recorded is there with no agent running: its version, the last run
    assert status["agent_version"] == reconciler.__version__
    assert status["last_reconcile_at"].endswith("Z") and status["last_reconcile_ms"] > 0
    assert status["apps"][0]["cpu_percent"] is None  # sampled only by a running agent

    table = command(run_status, "status", "--state-dir", str(state))
    lines = table.splitlines()
    assert lines[0] == f"node o1  [role=edge]  SYNCED  revision {rev[:12]}"
    assert lines[2] == (f"  agent {reconciler.__version__}  last reconcile "
                        f"{status['last_reconcile_at']} ({status['last_reconcile_ms']:.0f} ms)")
    header = lines[3].split()
    web_row = next(line.split() for line in lines if line.split()[:1] == ["web"])
    assert header[:8] == ["APP", "VERSION", "PHASE", "HEALTH", "PID", "UPTIME", "CPU",
                          "RESTARTS"]
    assert web_row[:4] == ["web", "1", "running", "healthy"] and web_row[6] == "-"

    # a broken upgrade: rolled back, exit 1 naming the app
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "2", port, "exit"))
    repo.commit_and_push("broken")
    # `plan --state-dir` reads what this node runs from the agent's store
    plan = command(run_plan, "plan", "--repo", repo.url, "--node-id", "o1", "--state-dir",
                   str(state), "--json")
    actions = json.loads(plan)["actions"]
    assert [(a["kind"], a["app"], a["from_version"], a["to_version"]) for a in actions] == [
        ("upgrade", "web", "1", "2")]
    run = subprocess.run(node_cmd(repo, "o1", state, "--once"), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert "o1: failed" in run.stderr and "web 1: running/healthy: rolled back from 2" \
        in run.stderr
    assert answers(port) == "1 o1"

    # the app died while no agent ran: status says so from /proc
    os.killpg(os.getpgid(app_pids("o1", state)["web"][0]), signal.SIGKILL)
    eventually(lambda: "web" not in app_pids("o1", state), what="web gone")
    status = local_status(state)
    assert status is not None
    assert (status.apps[0].health, status.apps[0].pid) == ("unhealthy", None)


def test_bad_options_and_missing_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reconciler.cli.main import parse_args
    from reconciler.cli.node_cmds import run_node, run_status

    node = ["node", "--repo", str(tmp_path), "--state-dir", str(tmp_path / "s"), "--node-id"]
    assert run_node(parse_args([*node, "Bad_Id"])) == 2
    assert "--node-id: 'Bad_Id' is not a valid node id" in capsys.readouterr().err
    assert run_node(parse_args([*node, "n1", "--interval", "soon"])) == 2
    assert "--interval: invalid duration 'soon'" in capsys.readouterr().err
    assert run_node(parse_args([*node, "n1", "--label", "novalue"])) == 2
    assert "--label: " in capsys.readouterr().err
    assert run_node(parse_args([*node, "n1", "--allowed-signers", str(tmp_path / "x")])) == 2
    assert f"--allowed-signers: {tmp_path / 'x'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing was created for bad options
    assert run_status(parse_args(["status", "--state-dir", str(tmp_path / "none")])) == 1
    assert "no agent state in" in capsys.readouterr().err


async def test_node_with_nats_and_systemd_notify(
    tmp_path: Path, app_script: Path, cleanup_node: list[str], nats_server: NatsServer
) -> None:
    """`node --nats` publishes events and status through the mesh; under systemd it says
    READY after the first reconcile, feeds the watchdog and says STOPPING on SIGTERM."""
    import asyncio
    import socket

    import nats

    from tests.conftest import eventually_async

    cleanup_node.append("m1")
    repo = make_spec_repo(tmp_path / "specs")
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    rev = repo.commit_and_push()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
           "WATCHDOG_USEC": "400000"}
    agent = subprocess.Popen(
        node_cmd(repo, "m1", tmp_path / "state", "--nats", nats_server.url, "--interval", "30s"),
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "agent.log").open("wb"),
    )
    messages: list[str] = []

    async def received(text: str) -> bool:
        while True:
            try:
                messages.append(notify.recv(4096).decode())
            except BlockingIOError:
                break
        return any(text in m for m in messages)

    nc = await nats.connect(nats_server.url)
    try:
        await eventually_async(lambda: received("READY=1"), timeout=30, what="READY=1")
        await eventually_async(lambda: received("WATCHDOG=1"), what="watchdog pings")
        js = nc.jetstream()

        async def synced() -> bool:
            kv = await js.key_value("gitops_nodes")
            status = json.loads((await kv.get("m1")).value or b"{}")
            return status["status"] == "synced" and status["revision"] == rev

        await eventually_async(synced, what="status synced in the KV")
        sub = await js.subscribe("gitops.events.m1.app.deployed", ordered_consumer=True)
        msg = await sub.next_msg(timeout=5)
        event = json.loads(msg.data)
        assert (event["app"], event["version"], event["revision"]) == ("web", "1", rev)
        assert msg.headers and msg.headers["Nats-Msg-Id"] == event["id"]
    finally:
        await nc.close()
        agent.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(agent.wait, 15)
    assert code == 0
    await eventually_async(lambda: received("STOPPING=1"), what="STOPPING=1")
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=first reconcile: success" in ready
    notify.close()
