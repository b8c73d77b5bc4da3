"""Issue #10 items 1, 6, 7 with real agents, processes and git: crash-safe upgrades (kill -9 of
`gitops-mesh node`, also at random points), a DAG apply, start-first upgrades, early health end."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from reconciler.node.agent import Agent
from reconciler.node.store import db_path, read_snapshot
from tests.conftest import SpecRepo, eventually, eventually_async, free_port, make_spec_repo
from tests.test_agent import (  # noqa: F401 (make_agent: a fixture)
    MakeAgent,
    answers,
    app_pids,
    app_yaml,
    events,
    kinds,
    make_agent,
)
from tests.test_agent_cli import app_script, cleanup_node, start_node  # noqa: F401 (fixtures)


def outbox_events(state: Path, app: str) -> list[dict[str, object]]:
    """The events queued in a node's store for `app` (no NATS in these tests)."""
    db = sqlite3.connect(f"file:{db_path(state)}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT payload FROM outbox ORDER BY seq").fetchall()
    finally:
        db.close()
    found = [json.loads(row[0]) for row in rows]
    return [e for e in found if e.get("app") == app]


def push(repo: SpecRepo, script: Path, version: str, port: int, mode: str,
         start_timeout: str = "5s", extra: str = "") -> None:
    repo.write("apps/web.yaml", app_yaml(script, "web", version, port, mode,
                                         start_timeout=start_timeout, extra=extra))
    repo.commit_and_push(f"web {version}")


def upgrading_to(state: Path, version: str) -> bool:
    snap = read_snapshot(state)
    if snap is None or "web" not in snap.apps:
        return False
    web = snap.apps["web"]
    return web.phase == "upgrading" and web.proc_version == version


def stop_agent(agent: object) -> None:
    import subprocess

    assert isinstance(agent, subprocess.Popen)
    agent.send_signal(signal.SIGTERM)
    agent.wait(15)


@pytest.mark.parametrize(("node", "mode", "wanted", "event", "failed"), [
    # v2 answers HTTP 500 only: never healthy -> rolled back, not retried
    ("h1", "sick0", "1", "app.rolled-back", "2"),
    # v2 takes 1.5 s to listen -> the upgrade is finished
    ("h2", "slow1.5", "2", "app.upgraded", None),
])
def test_kill_9_in_the_health_wait_of_an_upgrade_ends_it_as_without_the_crash(
    tmp_path: Path, app_script: Path, cleanup_node: list[str],  # noqa: F811
    node: str, mode: str, wanted: str, event: str, failed: str | None,
) -> None:
    cleanup_node.append(node)
    repo = make_spec_repo(tmp_path / "specs")
    state, log = tmp_path / "state", tmp_path / "agent.log"
    port = free_port()
    push(repo, app_script, "1", port, "ok")
    agent = start_node(repo, node, state, log)
    try:
        eventually(lambda: answers(port) == f"1 {node}", what="v1 running")
        push(repo, app_script, "2", port, mode, start_timeout="4s")
        eventually(lambda: upgrading_to(state, "2"), what="upgrade in progress")
    finally:  # the agent dies during the health wait of 2
        agent.kill()
        agent.wait()
    agent = start_node(repo, node, state, log)
    try:
        def ended() -> bool:
            snap = read_snapshot(state)
            assert snap is not None
            web = snap.apps["web"]
            assert (web.version, web.phase, web.failed_version) == (wanted, "running", failed)
            return answers(port) == f"{wanted} {node}"

        eventually(ended, timeout=20, what=f"{wanted} running after the restart")
        snap = read_snapshot(state)
        assert snap is not None
        assert app_pids(node, state) == {"web": [snap.apps["web"].pid]}
        time.sleep(1.0)  # a few polls later: nothing is tried again
        assert answers(port) == f"{wanted} {node}"
        types = [e["type"] for e in outbox_events(state, "web")]
        assert types.count(event) == 1, types
        assert not {"app.upgraded", "app.rolled-back", "app.failed"} & set(types) - {event}
    finally:
        stop_agent(agent)


# --- item 7: less downtime on a failed upgrade ----------------------------------------------

START_FIRST = "upgrade: {strategy: start-first}\n"


def started_and_stopped(install_dir: str) -> tuple[int, int]:
    """(starts, stops) that the test app wrote into its install dir."""
    def count(name: str) -> int:
        path = Path(install_dir) / name
        return len(path.read_text().splitlines()) if path.exists() else 0

    return count("started"), count("stopped")


async def test_start_first_keeps_the_old_version_running_when_the_new_one_fails(
    tmp_path: Path, make_agent: MakeAgent, app_script: Path,  # noqa: F811
) -> None:
    repo = make_spec_repo(tmp_path / "specs")
    port1, port2, port3 = free_port(), free_port(), free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port1, extra=START_FIRST))
    repo.commit_and_push()
    agent = await make_agent(repo)
    assert (await agent.reconcile_now()).outcome == "success"
    v1 = agent.store.get_app("web")
    assert v1 is not None and v1.install_dir is not None
    # 2 never gets healthy (500s); it runs beside 1, which is never stopped
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "2", port2, "sick0",
                                         start_timeout="3s", extra=START_FIRST))
    repo.commit_and_push("web 2")
    run = await agent.reconcile_now()
    assert run.outcome == "failure"
    web = agent.store.get_app("web")
    assert web is not None
    assert (web.version, web.phase, web.failed_version, web.pid) == ("1", "running", "2", v1.pid)
    assert started_and_stopped(v1.install_dir) == (1, 0)
    assert answers(port1) == "1 n1" and answers(port2) is None
    assert kinds(agent, "web")[-1] == "app.rolled-back"
    assert agent.runtime.names() == {"web"}
    # a good 3 switches: 3 answers, 1 is stopped once, one process is left
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "3", port3, extra=START_FIRST))
    repo.commit_and_push("web 3")
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    web = agent.store.get_app("web")
    assert web is not None
    assert (web.version, web.phase, web.health, web.prev_pid) == ("3", "running", "healthy", None)
    assert answers(port3) == "3 n1" and answers(port1) is None
    assert started_and_stopped(v1.install_dir) == (1, 1)
    assert agent.runtime.names() == {"web"}
    assert app_pids("n1", agent.config.state_dir) == {"web": [web.pid]}
    assert kinds(agent, "web")[-1] == "app.upgraded"
    # the renamed instance is supervised under the app's name: a crash restarts it
    assert web.pid is not None
    os.kill(web.pid, signal.SIGKILL)

    async def restarted() -> bool:
        now = agent.store.get_app("web")
        return now is not None and now.pid not in (None, web.pid) and \
            await asyncio.to_thread(answers, port3) == "3 n1"

    await eventually_async(restarted, what="web 3 restarted by its supervisor")


async def test_stop_first_ends_the_health_wait_early_for_a_definitely_broken_version(
    tmp_path: Path, make_agent: MakeAgent, app_script: Path,  # noqa: F811
) -> None:
    repo = make_spec_repo(tmp_path / "specs")
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    repo.commit_and_push()
    agent = await make_agent(repo)
    assert (await agent.reconcile_now()).outcome == "success"
    # 2 answers 500 from the start: 3 failed probes 100 ms apart end its wait, not the 60 s
    sick = app_yaml(app_script, "web", "2", port, "sick0", start_timeout="60s")
    sick = sick.replace("interval: 1s", "interval: 100ms")
    repo.write("apps/web.yaml", sick)
    repo.commit_and_push("web 2")
    run = await asyncio.wait_for(agent.reconcile_now(), timeout=20)
    assert run.outcome == "failure"
    web = agent.store.get_app("web")
    assert web is not None and (web.version, web.failed_version) == ("1", "2")
    assert "in a row" in web.message
    assert answers(port) == "1 n1"


# --- item 1: kill -9 at random points of an upgrade ---------------------------------------

def recorded_instances(state: Path) -> set[str]:
    """The per-start markers (GITOPS_INSTANCE) of the processes the store records."""
    import psutil

    from reconciler.node.runtimes.process import instance_of

    snap = read_snapshot(state)
    assert snap is not None
    found = set()
    for record in snap.apps.values():
        if record.pid is not None:
            found.add(instance_of(psutil.Process(record.pid)))
    return {marker for marker in found if marker}


def running_instances(node: str, state: Path) -> set[str]:
    import psutil

    from reconciler.node.runtimes.process import instance_of

    markers = set()
    for pids in app_pids(node, state).values():
        for pid in pids:
            marker = instance_of(psutil.Process(pid))
            markers.add(marker or f"unmarked pid {pid}")
    return markers


def test_kill_9_at_random_points_of_upgrades_converges(
    tmp_path: Path, app_script: Path, cleanup_node: list[str],  # noqa: F811
) -> None:
    seed = int(os.environ.get("GITOPS_CRASH_SEED", random.randrange(1 << 30)))
    print(f"crash test seed {seed} (GITOPS_CRASH_SEED={seed} repeats it)")
    rng = random.Random(seed)
    # (label, v2 mode, strategy): the plan wants 2 when it becomes healthy, else 1
    scenarios = [("good", "slow0.5", "stop-first"), ("bad", "sick0", "stop-first"),
                 ("good", "slow0.5", "start-first"), ("bad", "sick0", "start-first")]
    for index, (label, mode, strategy) in enumerate(scenarios):
        node = f"r{index}"
        cleanup_node.append(node)
        crash_scenario(tmp_path / node, app_script, node, rng, label, mode, strategy, kills=3)


def crash_scenario(root: Path, script: Path, node: str, rng: random.Random, label: str,
                   mode: str, strategy: str, kills: int) -> None:
    """v1 running, v2 pushed, the agent killed -9 `kills` times at random moments; then the
    node must converge to what the plan says with one process and nothing left over."""
    repo = make_spec_repo(root / "specs")
    state, log = root / "state", root / "agent.log"
    port1, port2 = free_port(), free_port()
    extra = f"upgrade: {{strategy: {strategy}}}\n"

    def spec(version: str, port: int, how: str) -> str:
        text = app_yaml(script, "web", version, port, how, start_timeout="2s", extra=extra)
        return text.replace("interval: 1s", "interval: 100ms")

    repo.write("apps/web.yaml", spec("1", port1, "ok"))
    repo.commit_and_push()
    agent = start_node(repo, node, state, log)
    try:
        eventually(lambda: answers(port1) == f"1 {node}", what=f"{node}: v1 running")
        repo.write("apps/web.yaml", spec("2", port2, mode))
        repo.commit_and_push("web 2")
        for kill in range(kills):
            delay = rng.uniform(0.0, 1.2) if kill == 0 else rng.uniform(0.6, 2.0)
            print(f"{node} {label} {strategy}: kill -9 after {delay:.2f}s")
            time.sleep(delay)
            agent.kill()
            agent.wait()
            agent = start_node(repo, node, state, log)
        wanted, port = ("2", port2) if label == "good" else ("1", port1)

        def converged() -> bool:
            snap = read_snapshot(state)
            assert snap is not None
            web = snap.apps["web"]
            assert (web.version, web.phase) == (wanted, "running"), \
                (web.version, web.phase, web.message)
            assert answers(port) == f"{wanted} {node}"
            # exactly one process, the recorded one; nothing left of other starts
            assert running_instances(node, state) == recorded_instances(state)
            return len(app_pids(node, state).get("web", [])) == 1

        eventually(converged, timeout=20, what=f"{node} {label} {strategy} converged")
        if label == "bad":
            snap = read_snapshot(state)
            assert snap is not None and snap.apps["web"].failed_version == "2"
            assert answers(port2) is None
    finally:
        stop_agent(agent)


# --- item 6: isolation --------------------------------------------------------------------

def deployed_order(agent: Agent) -> list[str]:
    return [e["app"] for e in events(agent) if e["type"] == "app.deployed"]


async def test_an_app_starts_once_its_own_dependencies_are_healthy(
    tmp_path: Path, make_agent: MakeAgent, app_script: Path,  # noqa: F811
) -> None:
    repo = make_spec_repo(tmp_path / "specs")
    ports = {name: free_port() for name in ("slow", "fast", "user")}
    # slow takes 1.5 s to answer; user needs only fast, so it must not wait for slow
    repo.write("apps/slow.yaml", app_yaml(app_script, "slow", "1", ports["slow"], "slow1.5"))
    repo.write("apps/fast.yaml", app_yaml(app_script, "fast", "1", ports["fast"]))
    repo.write("apps/user.yaml", app_yaml(app_script, "user", "1", ports["user"],
                                          depends_on=("fast",)))
    repo.commit_and_push()
    agent = await make_agent(repo)
    assert (await agent.reconcile_now()).outcome == "success"
    order = deployed_order(agent)
    assert order.index("fast") < order.index("user") < order.index("slow"), order


def exiting_db(script: Path, mode: str, backoff: str, max_restarts: int) -> str:
    """An app `db` without a probe whose process exits (mode die<seconds>) after each start."""
    return (f"name: db\nversion: \"1\"\nrun:\n  command: [{sys.executable}, {script}, "
            f"\"{free_port()}\", \"1\", {mode}]\nrestart:\n  backoff: "
            f"{{initial: {backoff}, max: {backoff}}}\n  max_restarts: {max_restarts}\n")


async def test_a_restarting_dependency_is_not_healthy_for_its_dependents(
    tmp_path: Path, make_agent: MakeAgent, app_script: Path,  # noqa: F811
) -> None:
    repo = make_spec_repo(tmp_path / "specs")
    port = free_port()
    # db has no probe and exits 0.3 s after each start; 1 s of backoff between restarts
    repo.write("apps/db.yaml", exiting_db(app_script, "die0.3", "1s", max_restarts=100))
    repo.write("apps/api.yaml", app_yaml(app_script, "api", "1", port, depends_on=("db",)))
    repo.commit_and_push()
    agent = await make_agent(repo)
    await agent.reconcile_now()
    await eventually_async(lambda: _async(agent.runtime.state("db") == "backoff"),
                           what="db in restart backoff")
    repo.write("apps/api.yaml", app_yaml(app_script, "api", "2", port, depends_on=("db",)))
    repo.commit_and_push("api 2")
    await eventually_async(lambda: _async(agent.runtime.state("db") == "backoff"),
                           what="db in restart backoff again")
    run = await agent.reconcile_now()
    assert run.outcome == "failure"
    api = agent.store.get_app("api")
    assert api is not None and api.phase == "blocked" and "restarting" in api.message
    assert api.version == "1"  # not upgraded next to a dependency that is down


async def test_dependents_of_a_dependency_that_fails_later_are_reported(
    tmp_path: Path, make_agent: MakeAgent, app_script: Path,  # noqa: F811
) -> None:
    repo = make_spec_repo(tmp_path / "specs")
    port = free_port()
    # db runs 0.5 s per start: after 2 restarts it is a crash loop, failed
    repo.write("apps/db.yaml", exiting_db(app_script, "die0.5", "50ms", max_restarts=2))
    repo.write("apps/api.yaml", app_yaml(app_script, "api", "1", port, depends_on=("db",)))
    repo.write("apps/top.yaml", app_yaml(app_script, "top", "1", free_port(),
                                         depends_on=("api",)))
    repo.commit_and_push()
    agent = await make_agent(repo)
    await agent.reconcile_now()

    async def reported() -> bool:
        status = {a.name: a for a in agent.status().apps}
        return status["db"].phase == "failed" and status["api"].phase == "blocked" \
            and status["top"].phase == "blocked"

    await eventually_async(reported, what="db failed, its dependents reported blocked")
    assert agent.status().status == "failed"
    assert "app.blocked" in kinds(agent, "api")


async def _async(value: bool) -> bool:
    return value


async def test_a_revision_pushed_during_a_long_reconcile_is_taken_up_between_steps(
    tmp_path: Path, make_agent: MakeAgent, app_script: Path,  # noqa: F811
) -> None:
    repo = make_spec_repo(tmp_path / "specs")
    slow_port, after_port = free_port(), free_port()
    repo.write("apps/slow.yaml", app_yaml(app_script, "slow", "1", slow_port, "slow1.5"))
    repo.write("apps/after.yaml", app_yaml(app_script, "after", "1", after_port,
                                           depends_on=("slow",)))
    repo.commit_and_push()
    agent = await make_agent(repo)
    run_id = agent.trigger("manual")

    async def slow_starting() -> bool:
        slow = agent.store.get_app("slow")
        return slow is not None and slow.phase == "deploying"

    await eventually_async(slow_starting, what="slow deploying")
    repo.write("apps/after.yaml", app_yaml(app_script, "after", "2", after_port,
                                           depends_on=("slow",)))
    rev2 = repo.commit_and_push("after 2")
    agent.trigger("source changed")
    run = await agent.loop.wait_run(run_id)
    assert run.outcome == "success", run.message
    # the run went on at the new revision: after was deployed once, at 2, never at 1
    assert [(e["type"], e["version"]) for e in events(agent) if e.get("app") == "after"] == [
        ("app.deployed", "2")]
    assert agent.store.node_meta().applied_revision == rev2
    assert await asyncio.to_thread(answers, after_port) == "2 n1"
