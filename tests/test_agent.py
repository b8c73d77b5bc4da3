"""The node agent end to end, in process: real git pushes, real child processes, real probes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from reconciler.node.agent import Agent, AgentConfig
from reconciler.node.store import read_snapshot
from tests.conftest import SpecRepo, free_port, git, make_spec_repo

APP_SCRIPT = textwrap.dedent('''
    """Test app: serves its version over HTTP on argv port (+ GITOPS_PORT_OFFSET)."""
    import http.server, os, signal, sys, time
    port = int(sys.argv[1]) + int(os.environ.get("GITOPS_PORT_OFFSET", "0"))
    version, mode = sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "ok"
    with open(os.path.join(os.environ["GITOPS_APP_DIR"], "started"), "a") as out:
        out.write(repr(time.time()) + chr(10))
    def on_term(*_):
        with open(os.path.join(os.environ["GITOPS_APP_DIR"], "stopped"), "a") as out:
            out.write(repr(time.time()) + chr(10))
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    if mode == "exit":
        sys.exit(3)
    if mode.startswith("slow"):
        time.sleep(float(mode[4:]))
    if mode.startswith("die"):
        time.sleep(float(mode[3:]))
        sys.exit(4)
    born = time.time()
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (version + " " + os.environ.get("GITOPS_NODE_ID", "")).encode()
            sick = mode.startswith("sick") and time.time() - born > float(mode[4:])
            self.send_response(500 if sick else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
''')

SECRET = "hunter2-very-secret-value"


@pytest.fixture(scope="module")
def app_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("app") / "app.py"
    path.write_text(APP_SCRIPT)
    return path


def app_yaml(
    script: Path, name: str, version: str, port: int, mode: str = "ok", *,
    depends_on: tuple[str, ...] = (), extra: str = "", start_timeout: str = "5s",
) -> str:
    deps = f"depends_on: [{', '.join(depends_on)}]\n" if depends_on else ""
    return (
        f"name: {name}\nversion: \"{version}\"\n{deps}"
        f"run:\n  command: [{sys.executable}, {script}, \"{port}\", \"{version}\", {mode}]\n"
        f"  env: {{API_TOKEN: {SECRET}}}\n  stop_timeout: 2s\n"
        f"health:\n  http: {{url: \"http://127.0.0.1:{port}/\"}}\n"
        f"  interval: 1s\n  timeout: 1s\n  start_timeout: {start_timeout}\n"
        f"restart:\n  backoff: {{initial: 50ms, max: 200ms}}\n" + extra
    )


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
        return resp.read().decode()


def answers(port: int) -> str | None:
    """get(), or None while nothing listens (for eventually-checks)."""
    try:
        return get(port)
    except OSError:
        return None


def events(agent: Agent) -> list[dict[str, Any]]:
    return [json.loads(e.payload) for e in agent.store.outbox_batch(100_000)]


def kinds(agent: Agent, app: str | None = None) -> list[str]:
    return [e["type"] for e in events(agent) if app is None or e.get("app") == app]


def app_pids(node: str, state_dir: Path) -> dict[str, list[int]]:
    """Live processes started for `node`'s apps by the agent on `state_dir` (or any state
    dir under it), by the env the agent gives them: another agent on this machine may use
    the same node id."""
    root = state_dir.resolve()
    found: dict[str, list[int]] = {}
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
            if env.get("GITOPS_NODE_ID") != node or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            app_dir = Path(env["GITOPS_APP_DIR"]).resolve()
            if app_dir.is_relative_to(root):
                found.setdefault(app_dir.parent.name, []).append(proc.pid)
        except (psutil.Error, KeyError, OSError):
            continue
    return found


MakeAgent = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def make_agent(tmp_path: Path) -> AsyncIterator[MakeAgent]:
    agents: list[Agent] = []

    async def factory(repo: SpecRepo, node: str = "n1", **options: Any) -> Agent:
        config = AgentConfig(
            node_id=node, repo_url=repo.url, state_dir=tmp_path / f"state-{node}",
            interval=3600, heartbeat=3600, **options,
        )
        agent = Agent(config)
        await agent.start(first_reconcile=False)
        agents.append(agent)
        return agent

    yield factory
    for agent in agents:
        await agent.close(stop_apps=True)


@pytest.fixture
def repo(tmp_path: Path) -> SpecRepo:
    return make_spec_repo(tmp_path / "specs")


async def test_deploy_upgrade_rollback(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1.0", port))
    rev1 = repo.commit_and_push("web 1.0")
    agent = await make_agent(repo)

    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    assert get(port) == "1.0 n1"
    status = agent.status()
    assert (status.status, status.revision) == ("synced", rev1)
    web = status.apps[0]
    assert (web.name, web.version, web.phase, web.health) == ("web", "1.0", "running", "healthy")
    assert web.pid is not None and web.pid == agent.store.get_app("web").pid  # type: ignore[union-attr]
    assert kinds(agent) == ["node.started", "reconcile.started", "source.fetched",
                            "app.deployed", "reconcile.finished"]
    deployed = events(agent)[3]
    assert deployed["revision"] == rev1 and deployed["outcome"] == "success"
    assert deployed["run_id"] == run.run_id and len(deployed["trace_id"]) == 32
    assert deployed["duration_ms"] > 0

    # upgrade
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1.1", port))
    rev2 = repo.commit_and_push("web 1.1")
    plan = await agent.plan()  # what a reconcile would do, doing nothing
    assert [(a.kind.value, a.app, a.from_version, a.to_version) for a in plan.actions] == [
        ("upgrade", "web", "1.0", "1.1")]
    assert plan.revision == rev2 and get(port) == "1.0 n1"
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    assert get(port) == "1.1 n1"
    upgraded = [e for e in events(agent) if e["type"] == "app.upgraded"]
    assert [(e["version"], e["from_version"], e["revision"]) for e in upgraded] == [
        ("1.1", "1.0", rev2)]
    assert agent.status().status == "synced"

    # a broken version: rolled back, 1.1 keeps serving, the node reports the failed rollout
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1.2", port, "exit"))
    rev3 = repo.commit_and_push("web 1.2 (broken)")
    run = await agent.reconcile_now()
    assert run.outcome == "failure"
    assert get(port) == "1.1 n1"
    rolled = [e for e in events(agent) if e["type"] == "app.rolled-back"]
    assert len(rolled) == 1
    assert (rolled[0]["version"], rolled[0]["from_version"], rolled[0]["outcome"]) == (
        "1.1", "1.2", "failure")
    assert "exited before it became healthy" in rolled[0]["message"]
    status = agent.status()
    web = status.apps[0]
    assert (web.version, web.phase, web.health, web.failed_version) == (
        "1.1", "running", "healthy", "1.2")
    assert web.message.startswith("rolled back from 1.2: ")
    assert (status.status, status.revision) == ("failed", rev3)
    assert "web 1.2" in status.message
    assert app_pids("n1", agent.config.state_dir) == {"web": [web.pid]}

    # the failed spec is not retried on the next poll, which finds nothing to do: no events
    before = len(events(agent))
    run = await agent.reconcile_now("poll")
    assert (run.outcome, run.message) == ("success", "no changes")
    assert events(agent)[before:] == []
    assert get(port) == "1.1 n1"
    # a person asking gets one answer: finished, at the applied revision, "no changes"
    run = await agent.reconcile_now("rpc")
    assert [(e["type"], e["revision"], e["outcome"], e["message"], e["data"])
            for e in events(agent)[before:]] == [
        ("reconcile.finished", rev3, "success", "no changes", {"reason": "rpc"})]
    status = agent.status()
    assert (status.status, status.revision, status.last_reconcile_ms) == (
        "failed", rev3, run.duration_ms)

    # the secret env value is nowhere in what the agent publishes
    published = b"".join(e.payload for e in agent.store.outbox_batch(100_000))
    assert SECRET.encode() not in published
    assert SECRET not in agent.status().model_dump_json()
    assert SECRET not in json.dumps(agent.state())
    assert agent.state()["current"]["web"]["spec"]["run"]["env"] == {"API_TOKEN": "***"}


async def test_dependency_chain_order_and_removal(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    ports = {name: free_port() for name in "abc"}
    repo.write("apps/a.yaml", app_yaml(app_script, "a", "1", ports["a"], "slow0.3"))
    repo.write("apps/b.yaml", app_yaml(app_script, "b", "1", ports["b"], "slow0.3",
                                       depends_on=("a",)))
    repo.write("apps/c.yaml", app_yaml(app_script, "c", "1", ports["c"], depends_on=("b",)))
    repo.commit_and_push("chain")
    agent = await make_agent(repo)
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    deployed = [e for e in events(agent) if e["type"] == "app.deployed"]
    assert [e["app"] for e in deployed] == ["a", "b", "c"]
    # each process started only after its dependency was reported healthy
    started = {a: float(Path(agent.store.get_app(a).install_dir, "started").read_text())  # type: ignore[arg-type, union-attr]
               for a in "abc"}
    healthy_at = {e["app"]: _epoch(e["time"]) for e in deployed}
    assert started["b"] >= healthy_at["a"] - 0.01
    assert started["c"] >= healthy_at["b"] - 0.01

    # remove all three: dependents first (one empty file says "no apps" on purpose)
    repo.write("apps/none.yaml", "# no apps on purpose\n")
    repo.remove("apps/a.yaml")
    repo.remove("apps/b.yaml")
    repo.remove("apps/c.yaml")
    repo.commit_and_push("remove all")
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    removed = [e["app"] for e in events(agent) if e["type"] == "app.removed"]
    assert removed == ["c", "b", "a"]
    assert app_pids("n1", agent.config.state_dir) == {}
    assert agent.status().apps == []
    assert not (agent.config.state_dir / "apps" / "a").exists()


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_failed_dependency_blocks_dependents_only(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    p = {name: free_port() for name in ("db", "api", "solo")}
    repo.write("apps/db.yaml", app_yaml(app_script, "db", "1", p["db"], "exit"))
    repo.write("apps/api.yaml", app_yaml(app_script, "api", "1", p["api"],
                                         depends_on=("db",)))
    repo.write("apps/solo.yaml", app_yaml(app_script, "solo", "1", p["solo"]))
    repo.commit_and_push("db broken")
    agent = await make_agent(repo)
    run = await agent.reconcile_now()
    assert run.outcome == "failure"
    phases = {a.name: (a.phase, a.message) for a in agent.status().apps}
    assert phases["solo"] == ("running", "")
    assert phases["db"][0] == "failed"
    assert "exited before it became healthy" in phases["db"][1]
    assert phases["api"] == ("blocked", "dependency db failed")
    assert get(p["solo"]) == "1 n1"
    blocked = [e for e in events(agent) if e["type"] == "app.blocked"]
    assert [(e["app"], e["message"]) for e in blocked] == [("api", "dependency db failed")]
    status = agent.status()
    assert status.status == "failed" and "api" in status.message and "db" in status.message
    assert set(app_pids("n1", agent.config.state_dir)) == {"solo"}

    # a poll with nothing new: still a failure, no repeated app.blocked event
    again = await agent.reconcile_now()
    assert again.outcome == "failure" and "db: failed:" in again.message
    assert [e["type"] for e in events(agent)].count("app.blocked") == 1

    # fixing the dependency lets the blocked app start on the next reconcile
    repo.write("apps/db.yaml", app_yaml(app_script, "db", "2", p["db"]))
    repo.commit_and_push("db fixed")
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    assert agent.status().status == "synced"
    assert get(p["api"]) == "1 n1"


async def test_supervision_restart_and_crash_loop(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    port, flaky_port = free_port(), free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    # no probe: healthy while it runs; it dies after 0.3 s each time -> crash loop
    repo.write("apps/flaky.yaml", textwrap.dedent(f"""\
        name: flaky
        version: "1"
        run: {{command: [{sys.executable}, {app_script}, "{flaky_port}", "1", die0.3]}}
        restart: {{backoff: {{initial: 50ms, max: 100ms}}, max_restarts: 2, window: 60s}}
    """))
    repo.commit_and_push("two apps")
    agent = await make_agent(repo)
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    first_pid = agent.status().apps[1].pid
    assert first_pid is not None
    os.kill(first_pid, 9)

    def restarted() -> bool:
        web = agent.store.get_app("web")
        assert web is not None and web.restarts == 1 and web.pid != first_pid
        return answers(port) == "1 n1"

    await _eventually_async(restarted, what="web restarted after kill -9")
    web = agent.store.get_app("web")
    assert web is not None and web.process is not None
    assert psutil.Process(web.pid).create_time() == pytest.approx(web.create_time, abs=0.05)
    assert "app.restarted" in kinds(agent, "web")

    def crash_looped() -> bool:
        flaky = agent.store.get_app("flaky")
        assert flaky is not None and flaky.phase == "failed"
        return True

    await _eventually_async(crash_looped, what="flaky marked failed")
    failed = [e for e in events(agent) if e["type"] == "app.failed"]
    assert [e["app"] for e in failed] == ["flaky"]
    status = agent.status()
    assert status.status == "failed" and "flaky" in status.message
    assert {a.name: a.phase for a in status.apps} == {"flaky": "failed", "web": "running"}


async def _eventually_async(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    from tests.conftest import eventually_async

    async def wrapped() -> bool:
        return check()

    await eventually_async(wrapped, timeout=timeout, what=what)


async def test_invalid_spec_touches_nothing(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    port, other = free_port(), free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    repo.write("apps/other.yaml", app_yaml(app_script, "other", "1", other))
    repo.commit_and_push()
    agent = await make_agent(repo)
    assert (await agent.reconcile_now()).outcome == "success"
    pids = app_pids("n1", agent.config.state_dir)

    # a typo in one file, the other file deleted: nothing stops, nothing restarts
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "2", port).replace(
        "health:", "helth:"))
    repo.remove("apps/other.yaml")
    repo.commit_and_push("broken")
    run = await agent.reconcile_now()
    assert run.outcome == "failure"
    assert "apps/web.yaml:" in run.message
    status = agent.status()
    assert status.spec_errors and status.spec_errors[0].startswith("apps/web.yaml:")
    line_col = status.spec_errors[0].split(":")[1:3]
    assert all(part.isdigit() for part in line_col), status.spec_errors
    assert app_pids("n1", agent.config.state_dir) == pids
    assert get(port) == "1 n1" and get(other) == "1 n1"
    assert status.status == "degraded"
    finished = [e for e in events(agent) if e["type"] == "reconcile.finished"][-1]
    assert finished["outcome"] == "failure" and "apps/web.yaml:" in finished["message"]


async def test_source_gone_keeps_running_then_recovers(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    rev = repo.commit_and_push()
    agent = await make_agent(repo)
    assert (await agent.reconcile_now()).outcome == "success"
    moved = repo.bare.with_name("moved.git")
    repo.bare.rename(moved)
    run = await agent.reconcile_now()
    assert run.outcome == "failure" and run.message.startswith("source: ")
    failed = [e for e in events(agent) if e["type"] == "source.failed"]
    assert failed and failed[0]["outcome"] == "failure"
    status = agent.status()
    assert status.source_error and status.revision == rev
    assert status.status == "degraded"
    assert get(port) == "1 n1"
    # the agent retries by itself with backoff (1 s first) and recovers when it is back
    moved.rename(repo.bare)

    def recovered() -> bool:
        return agent.status().source_error is None and agent.status().status == "synced"

    await _eventually_async(recovered, what="source error cleared by the retry", timeout=10)


async def test_a_source_outage_is_reported_once_not_on_every_retry(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    repo.commit_and_push()
    agent = await make_agent(repo)
    assert (await agent.reconcile_now()).outcome == "success"
    seen = len(events(agent))
    moved = repo.bare.with_name("moved.git")
    repo.bare.rename(moved)
    # polls and the agent's own backoff retries ("source retry") meet the same failure
    for reason in ("poll", "source retry", "poll", "source retry"):
        run = await agent.reconcile_now(reason)
        assert run.outcome == "failure" and run.message.startswith("source: ")
    outage = events(agent)[seen:]
    assert [e["type"] for e in outage] == [
        "reconcile.started", "source.failed", "reconcile.finished"]
    assert agent.status().source_error == outage[1]["message"]
    # someone who asks gets an answer, even for the same failure
    assert (await agent.reconcile_now("rpc")).outcome == "failure"
    assert [e["type"] for e in events(agent)[seen + 3:]] == [
        "reconcile.started", "source.failed", "reconcile.finished"]
    # recovery (with a new revision pushed meanwhile) is reported
    moved.rename(repo.bare)
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "2", port))
    rev = repo.commit_and_push("web 2")
    run = await agent.reconcile_now("poll")
    assert run.outcome == "success", run.message
    assert agent.status().source_error is None and agent.status().revision == rev
    fetched = [e for e in events(agent)[seen:] if e["type"] == "source.fetched"]
    assert [e["revision"] for e in fetched] == [rev]


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
async def test_unsigned_commit_refused(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path, tmp_path: Path
) -> None:
    key = tmp_path / "signing"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    public = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"release@example.invalid {public}\n")
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    git(repo.work, "add", "-A")
    git(repo.work, "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}",
        "commit", "-q", "-S", "-m", "signed")
    git(repo.work, "push", "-q", "origin", "HEAD:main")
    agent = await make_agent(repo, allowed_signers=allowed)
    assert (await agent.reconcile_now()).outcome == "success"

    repo.write("apps/web.yaml", app_yaml(app_script, "web", "2", port))
    unsigned = repo.commit_and_push("unsigned")
    run = await agent.reconcile_now()
    assert run.outcome == "failure"
    assert f"commit {unsigned[:12]} is not signed" in run.message
    assert get(port) == "1 n1"
    status = agent.status()
    assert status.apps[0].version == "1"
    assert (status.status, status.desired_revision) == ("degraded", status.revision)
    assert f"commit {unsigned[:12]} is not signed" in (status.source_error or "")
    assert [e["type"] for e in events(agent)].count("source.failed") == 1


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
async def test_signed_source_checks_every_new_commit_and_refuses_a_replay(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path, tmp_path: Path
) -> None:
    """Issue #10.8: only the tip was verified (an unsigned commit below a signed tip got in)
    and a force-push back to an older signed commit was applied silently."""
    key = tmp_path / "signing"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    public = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"release@example.invalid {public}\n")
    sign = ("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}")
    port = free_port()

    def commit(version: str, signed: bool) -> str:
        repo.write("apps/web.yaml", app_yaml(app_script, "web", version, port))
        git(repo.work, "add", "-A")
        git(repo.work, *(sign if signed else ()), "commit", "-q",
            *(("-S",) if signed else ()), "-m", f"web {version}")
        git(repo.work, "push", "-q", "--force", "origin", "HEAD:main")
        return repo.head()

    first = commit("1", signed=True)
    agent = await make_agent(repo, allowed_signers=allowed)
    assert (await agent.reconcile_now()).outcome == "success"
    sneaked = commit("2", signed=False)
    second = commit("3", signed=True)  # a signed tip over an unsigned commit
    run = await agent.reconcile_now()
    assert run.outcome == "failure" and f"commit {sneaked[:12]} is not signed" in run.message
    assert (get(port), agent.status().revision) == ("1 n1", first)

    git(repo.work, "reset", "-q", "--hard", first)  # history without the unsigned commit
    signed_tip = commit("3", signed=True)
    assert second != signed_tip
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    assert agent.status().revision == signed_tip

    git(repo.work, "reset", "-q", "--hard", first)  # replay the older signed revision
    git(repo.work, "push", "-q", "--force", "origin", "HEAD:main")
    run = await agent.reconcile_now()
    assert run.outcome == "failure" and "refusing to move back" in run.message
    status = agent.status()
    assert status.revision == signed_tip and "refusing to move back" in (status.source_error or "")
    failed = [e for e in events(agent) if e["type"] == "source.failed"]
    assert failed and "refusing to move back" in failed[-1]["message"]


async def test_wrong_archive_digest_fails_only_that_app(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path, tmp_path: Path
) -> None:
    import tarfile

    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(app_script, arcname="app.py")
    port, good_port = free_port(), free_port()
    repo.write("apps/bundle.yaml", textwrap.dedent(f"""\
        name: bundle
        version: "1"
        source: {{type: archive, url: "file://{archive}", sha256: "{'0' * 64}"}}
        run: {{command: [{sys.executable}, app.py, "{port}", "1"]}}
    """))
    repo.write("apps/good.yaml", app_yaml(app_script, "good", "1", good_port))
    repo.commit_and_push()
    agent = await make_agent(repo)
    run = await agent.reconcile_now()
    assert run.outcome == "failure"
    apps = {a.name: a for a in agent.status().apps}
    assert apps["good"].phase == "running" and get(good_port) == "1 n1"
    assert apps["bundle"].phase == "failed"
    assert "sha256" in apps["bundle"].message
    assert set(app_pids("n1", agent.config.state_dir)) == {"good"}


async def test_suspend_and_resume(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    repo.commit_and_push()
    agent = await make_agent(repo)
    assert (await agent.reconcile_now()).outcome == "success"
    await agent.suspend("web")
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "2", port))
    repo.commit_and_push("v2 while suspended")
    await agent.reconcile_now()
    assert get(port) == "1 n1"
    assert agent.status().apps[0].suspended
    await agent.resume("web")  # resume triggers a reconcile
    await _eventually_async(lambda: answers(port) == "2 n1", what="upgraded after resume")

    await agent.suspend()
    assert agent.status().status == "suspended"
    run = await agent.reconcile_now()
    assert run.outcome == "skipped"
    await agent.resume()
    assert "app.suspended" in kinds(agent, "web") and "app.resumed" in kinds(agent, "web")
    with pytest.raises(ValueError, match="unknown app 'ghost'"):
        await agent.suspend("ghost")
    assert read_snapshot(agent.config.state_dir).meta.get("node_suspended") is None  # type: ignore[union-attr]


async def test_telemetry_spans_metrics_and_trace_ids(
    repo: SpecRepo, tmp_path: Path, app_script: Path
) -> None:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from reconciler.node.telemetry import Telemetry

    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    telemetry = Telemetry("t1", environ={}, span_exporter=spans, metric_reader=reader)
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    repo.commit_and_push()
    agent = Agent(AgentConfig(node_id="t1", repo_url=repo.url, state_dir=tmp_path / "s",
                              interval=3600, heartbeat=3600), telemetry=telemetry)
    await agent.start(first_reconcile=False, schedule=False)
    try:
        run = await agent.reconcile_now()
        assert run.outcome == "success", run.message
        finished = {s.name: s for s in spans.get_finished_spans()}
        assert set(finished) == {"reconcile", "action"}
        trace_id = format(finished["reconcile"].context.trace_id, "032x")
        parent = finished["action"].parent
        assert parent is not None and parent.span_id == finished["reconcile"].context.span_id
        assert dict(finished["action"].attributes) == {  # type: ignore[arg-type]
            "kind": "deploy", "app": "web", "outcome": "success"}
        assert agent.status().trace_id == trace_id == run.trace_id
        in_run = [e for e in events(agent) if e.get("run_id") == run.run_id]
        assert {e["trace_id"] for e in in_run} == {trace_id}

        data = reader.get_metrics_data()
        assert data is not None
        metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics
                   for m in sm.metrics}
        assert set(metrics) == {"gitops.reconcile.duration", "gitops.actions",
                                "gitops.git.fetch.duration", "gitops.apps"}
        def points(name: str) -> list[tuple[dict[str, Any], Any]]:
            return [(dict(p.attributes or {}), getattr(p, "value", None))
                    for p in metrics[name].data.data_points]

        assert points("gitops.actions") == [({"kind": "deploy", "outcome": "success"}, 1)]
        assert points("gitops.apps") == [({"phase": "running"}, 1)]
    finally:
        await agent.close(stop_apps=True)


async def test_trigger_coalesces(repo: SpecRepo, make_agent: MakeAgent) -> None:
    import asyncio

    repo.write("apps/none.yaml", "# no apps\n")
    repo.commit_and_push()
    agent = await make_agent(repo)
    first = agent.trigger("a")
    assert agent.trigger("b") == first  # queued, not yet running: the same run covers it
    while not agent.reconciling:  # the worker picks it up at once
        await asyncio.sleep(0.001)
    queued = agent.trigger("c")  # one runs, one may wait
    assert queued != first and agent.trigger("d") == queued
    assert (await agent.wait_run(first)).outcome == "success"
    assert (await agent.wait_run(queued)).run_id == queued
    started = [e for e in events(agent) if e["type"] == "reconcile.started"]
    assert [(e["run_id"], e["message"]) for e in started] == [(first, "a")]  # a new revision
    finished = [e for e in events(agent) if e["type"] == "reconcile.finished"]
    assert [(e["run_id"], e["data"]["reason"]) for e in finished] == [
        (first, "a"), (queued, "c")]  # "c" found nothing to do: only the answer

    # a queued poll covering a person's request takes its reason, so that run answers
    before = len(events(agent))
    polled = agent.trigger("poll")
    assert agent.trigger("fleet") == polled and agent.trigger("poll") == polled
    await agent.wait_run(polled)
    assert [(e["type"], e["run_id"], e["data"]) for e in events(agent)[before:]] == [
        ("reconcile.finished", polled, {"reason": "fleet"})]


async def test_restart_after_crash_points_converges(
    repo: SpecRepo, tmp_path: Path, app_script: Path
) -> None:
    """An agent killed (a) right after recording an upgrade, before touching processes,
    (b) after spawning a process but before recording its pid, (c) while rolling back:
    the next agent converges with exactly one process per app, the right version each."""
    import yaml

    from reconciler.core.spec import AppSpec
    from reconciler.node.store import Store, spec_to_json

    port, other, roll = free_port(), free_port(), free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    repo.write("apps/other.yaml", app_yaml(app_script, "other", "1", other))
    repo.write("apps/roll.yaml", app_yaml(app_script, "roll", "1", roll))
    repo.commit_and_push()
    config = AgentConfig(node_id="c1", repo_url=repo.url, state_dir=tmp_path / "state",
                         interval=3600, heartbeat=3600)
    first = Agent(config)
    await first.start(first_reconcile=False, schedule=False)
    assert (await first.reconcile_now()).outcome == "success"
    await first.close(stop_apps=False)  # like kill -9: the apps keep running
    old = app_pids("c1", config.state_dir)

    repo.write("apps/web.yaml", app_yaml(app_script, "web", "2", port))
    repo.write("apps/roll.yaml", app_yaml(app_script, "roll", "2", roll, "exit"))
    repo.commit_and_push("web 2, roll 2 (broken)")

    def spec(name: str) -> AppSpec:
        text = (repo.work / "apps" / f"{name}.yaml").read_text()
        return AppSpec.model_validate(yaml.safe_load(text))

    store = Store(config.state_dir)
    web, roller = store.get_app("web"), store.get_app("roll")
    assert web is not None and roller is not None
    with store.transaction():
        # (a) the record the executor writes before it stops version 1
        store.update_app("web", version="2", spec_json=spec_to_json(spec("web")),
                         spec_hash=spec("web").spec_hash(), prev_version="1",
                         prev_spec_json=web.spec_json, prev_dir=web.install_dir,
                         phase="upgrading", prev_pid=web.pid, prev_pgid=web.pgid,
                         prev_create_time=web.create_time, pid=None, pgid=None,
                         create_time=None, proc_version=None)
        # (b) other's process runs but its pid was never recorded
        store.set_process("other", None)
        # (c) roll 2 failed; version 1 was started again when the agent died
        store.update_app("roll", version="2", spec_json=spec_to_json(spec("roll")),
                         spec_hash=spec("roll").spec_hash(), prev_version="1",
                         prev_spec_json=roller.spec_json, prev_dir=roller.install_dir,
                         phase="rolling-back")
    store.close()

    second = Agent(config)
    await second.start(first_reconcile=False, schedule=False)
    try:
        # web 1 and roll 1 adopted, the unrecorded process swept away (SIGKILL)
        await _eventually_async(
            lambda: app_pids("c1", config.state_dir) == {"web": old["web"], "roll": old["roll"]},
            what="unrecorded process killed")
        run = await second.reconcile_now()
        assert run.outcome == "success", run.message
        assert answers(port) == "2 c1" and answers(other) == "1 c1"
        assert answers(roll) == "1 c1"
        pids = app_pids("c1", config.state_dir)
        records = second.store.apps()
        assert pids == {name: [records[name].pid] for name in ("web", "other", "roll")}
        assert pids["web"] != old["web"] and pids["other"] != old["other"]
        assert pids["roll"] == old["roll"]
        assert [e["type"] for e in events(second) if e.get("app") == "web"][-1] == \
            "app.upgraded"
        # roll 2 is not retried: it failed before the crash
        assert (records["roll"].version, records["roll"].failed_version) == ("1", "2")
        assert second.status().status == "failed"
    finally:
        await second.close(stop_apps=True)
    assert app_pids("c1", config.state_dir) == {}


async def test_reverting_a_failed_push_clears_the_failure(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    repo.commit_and_push()
    agent = await make_agent(repo)
    await agent.reconcile_now()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "2", port, "exit"))
    repo.commit_and_push("broken")
    await agent.reconcile_now()
    assert agent.status().status == "failed"
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    rev = repo.commit_and_push("revert")
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    status = agent.status()
    assert (status.status, status.revision) == ("synced", rev)
    assert (status.apps[0].version, status.apps[0].failed_version, status.apps[0].message) == (
        "1", None, "")


def test_app_pids_ignores_another_agent_with_the_same_node_id(tmp_path: Path) -> None:
    """The helper above must not see apps of another agent (another checkout, a dev agent)
    that happens to use this test's node id."""
    other = tmp_path / "elsewhere" / "apps" / "web" / "1-abc"
    other.mkdir(parents=True)
    mine = tmp_path / "state-n1" / "apps" / "web" / "1-abc"
    mine.mkdir(parents=True)
    procs = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                         env={**os.environ, "GITOPS_NODE_ID": "n1", "GITOPS_APP_DIR": str(d)})
        for d in (other, mine)
    ]
    try:
        assert app_pids("n1", tmp_path / "state-n1") == {"web": [procs[1].pid]}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_launch_spec_env_and_argv(tmp_path: Path) -> None:
    """The app's environment: PATH from the agent, env_files (read on the node), the spec's
    env on top, then the agent's GITOPS_* values; shell commands only when asked for."""
    from reconciler.core.spec import AppSpec
    from reconciler.node.executor import Executor
    from reconciler.node.instances import ActionFailed, read_env_file
    from reconciler.node.runtimes.base import LaunchSpec, RestartPolicy
    from reconciler.node.store import Store

    app_dir = tmp_path / "apps" / "web" / "1-abc"
    app_dir.mkdir(parents=True)
    (app_dir / "app.env").write_text(
        "# comment\n\nexport DB_URL='postgres://db'\nMODE=file\nTOKEN=\"from-file\"\n")
    spec = AppSpec.model_validate({
        "name": "web", "version": "1",
        "run": {"command": ["./serve", "--port", "80"], "env": {"MODE": "spec"},
                "env_files": ["app.env"], "workdir": "bin", "stop_signal": "INT",
                "stop_timeout": "3s"},
        "restart": {"policy": "on-failure", "backoff": {"initial": "2s", "max": "1m"},
                    "max_restarts": 4, "window": "10m"},
    })
    executor = Executor(node_id="n7", store=Store(tmp_path / "state"), runtime=None,  # type: ignore[arg-type]
                        artifacts=None, hooks=None, log_dir=tmp_path / "logs",  # type: ignore[arg-type]
                        port_offset=100, base_env={"PATH": "/usr/bin"})
    assert executor.launch_for(spec, app_dir) == LaunchSpec(
        name="web", version="1", argv=("./serve", "--port", "80"),
        env={"PATH": "/usr/bin", "DB_URL": "postgres://db", "MODE": "spec",
             "TOKEN": "from-file", "GITOPS_NODE_ID": "n7", "GITOPS_APP_DIR": str(app_dir),
             "GITOPS_PORT_OFFSET": "100"},
        workdir=app_dir / "bin", log_dir=tmp_path / "logs", stop_signal="SIGINT",
        stop_timeout=3.0,
        restart=RestartPolicy(policy="on-failure", backoff_initial=2.0, backoff_max=60.0,
                              max_restarts=4, window=600.0),
    )
    shell = spec.model_copy(update={"run": spec.run.model_copy(  # type: ignore[union-attr]
        update={"command": ["echo $HOME"], "shell": True, "env_files": []})})
    assert executor.launch_for(shell, app_dir).argv == ("/bin/sh", "-c", "echo $HOME")  # type: ignore[union-attr]
    assert executor.launch_for(spec.model_copy(update={"run": None}), app_dir) is None

    (app_dir / "bad.env").write_text("OK=1\nthis line has a secret-value but no equals\n")
    with pytest.raises(ActionFailed) as failure:
        read_env_file(app_dir / "bad.env")
    assert str(failure.value) == f"env file {app_dir / 'bad.env'}:2: expected KEY=VALUE"
    with pytest.raises(ActionFailed, match=r"env file .*missing\.env: No such file"):
        read_env_file(app_dir / "missing.env")


async def test_port_offset_reaches_apps_and_probes(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    base = free_port()
    offset = free_port() - base
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", base))
    repo.commit_and_push()
    agent = await make_agent(repo, port_offset=offset)
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    assert get(base + offset) == "1 n1"  # the app listened on base + offset, the probe too


async def test_stop_apps_on_exit_stops_dependents_first(
    repo: SpecRepo, tmp_path: Path, app_script: Path
) -> None:
    ports = {name: free_port() for name in "abc"}
    repo.write("apps/a.yaml", app_yaml(app_script, "a", "1", ports["a"]))
    repo.write("apps/b.yaml", app_yaml(app_script, "b", "1", ports["b"], depends_on=("a",)))
    repo.write("apps/c.yaml", app_yaml(app_script, "c", "1", ports["c"], depends_on=("b",)))
    repo.commit_and_push()
    agent = Agent(AgentConfig(node_id="x1", repo_url=repo.url, state_dir=tmp_path / "s",
                              interval=3600, heartbeat=3600))
    await agent.start(first_reconcile=False, schedule=False)
    assert (await agent.reconcile_now()).outcome == "success"
    dirs = {name: Path(agent.store.get_app(name).install_dir)  # type: ignore[arg-type, union-attr]
            for name in "abc"}
    await agent.close(stop_apps=True)
    stopped = {name: float((d / "stopped").read_text()) for name, d in dirs.items()}
    assert stopped["c"] <= stopped["b"] <= stopped["a"]
    assert app_pids("x1", agent.config.state_dir) == {}


async def test_one_agent_per_state_dir(repo: SpecRepo, make_agent: MakeAgent) -> None:
    from reconciler.node.agent import StateDirBusy

    agent = await make_agent(repo)
    with pytest.raises(StateDirBusy, match=f"in use by another agent \\(pid {os.getpid()}\\)"):
        Agent(agent.config)


async def test_health_changes_are_events_and_status(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    port = free_port()
    # healthy for 1 s, then answers 500 while the process keeps running
    repo.write("apps/web.yaml", textwrap.dedent(f"""\
        name: web
        version: "1"
        run: {{command: [{sys.executable}, {app_script}, "{port}", "1", sick1]}}
        health:
          http: {{url: "http://127.0.0.1:{port}/"}}
          interval: 200ms
          failure_threshold: 2
    """))
    # files only, nothing to run: installed means running
    repo.write("apps/config.yaml", "name: config\nversion: \"7\"\n")
    repo.commit_and_push()
    agent = await make_agent(repo)
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    assert {a.name: (a.phase, a.health) for a in agent.status().apps} == {
        "config": ("running", "healthy"), "web": ("running", "healthy")}

    def degraded() -> bool:
        return agent.status().status == "degraded"

    await _eventually_async(degraded, what="web reported unhealthy", timeout=10)
    status = agent.status()
    assert status.message == "unhealthy: web"
    changed = [e for e in events(agent) if e["type"] == "app.health-changed"]
    assert [(e["app"], e["data"]) for e in changed] == [
        ("web", {"from": "healthy", "to": "unhealthy"})]
    assert "500" in changed[0]["message"]
    assert await agent.check_health("web") == {"web": "unhealthy"}
    assert await agent.check_health() == {"config": "healthy", "web": "unhealthy"}


async def test_reconfigure_restarts_with_the_new_spec(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    repo.commit_and_push()
    agent = await make_agent(repo)
    await agent.reconcile_now()
    before = agent.store.get_app("web")
    assert before is not None
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port).replace(
        SECRET, "rotated-" + SECRET))
    repo.commit_and_push("rotate the token")
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    after = agent.store.get_app("web")
    assert after is not None
    assert (after.version, after.phase) == ("1", "running")
    assert after.pid != before.pid and after.spec_hash != before.spec_hash
    reconfigured = [e for e in events(agent) if e["type"] == "app.reconfigured"]
    assert [(e["version"], e["from_version"]) for e in reconfigured] == [("1", "1")]
    assert SECRET not in caplog.text


async def test_relabeling_keeps_the_process_and_shows_the_new_labels(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    repo.commit_and_push()
    agent = await make_agent(repo)
    assert (await agent.reconcile_now()).outcome == "success"
    before = agent.store.get_app("web")
    assert before is not None and before.pid is not None
    repo.write("apps/web.yaml", app_yaml(
        app_script, "web", "1", port, extra="labels: {tier: frontend}\nlayer: edge\n"))
    repo.commit_and_push("relabel web")
    run = await agent.reconcile_now()
    assert run.outcome == "success", run.message
    after = agent.store.get_app("web")
    assert after is not None
    assert (after.pid, after.create_time, after.phase) == (before.pid, before.create_time,
                                                          "running")
    assert get(port) == "1 n1"
    (web,) = agent.status().apps
    assert (web.labels, web.layer, web.phase) == ({"tier": "frontend"}, "edge", "running")
    reconfigured = [e for e in events(agent) if e["type"] == "app.reconfigured"]
    assert [(e["message"], e["data"]) for e in reconfigured] == [
        ("labels, layer changed; not restarted",
         {"restart": False, "changed": ["labels", "layer"]})]
    # stored: the next run has nothing to do
    assert (await agent.reconcile_now()).message == "no changes"


async def test_polls_that_find_nothing_record_nothing_and_keep_status_timing(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path
) -> None:
    import asyncio

    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    rev1 = repo.commit_and_push("web 1")
    agent = await make_agent(repo)
    first = await agent.reconcile_now("startup")
    assert first.outcome == "success", first.message

    # polls with nothing to do: no events, but status tells when the last one ran
    before = len(events(agent))
    poll = await agent.reconcile_now("poll")
    assert (poll.outcome, poll.message) == ("success", "no changes")
    assert events(agent)[before:] == []
    status = agent.status()
    assert (status.last_reconcile_at, status.last_reconcile_ms, status.run_id) == (
        poll.finished_at, poll.duration_ms, poll.run_id)

    # a push the poll finds: started names the revision it applies, not the previous one
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "2", port, "slow0.5"))
    rev2 = repo.commit_and_push("web 2")
    run_id = agent.trigger("poll")
    while not agent.reconciling:
        await asyncio.sleep(0.01)
    during = agent.status()  # the previous run's timing stays until this one ends
    assert (during.last_reconcile_at, during.last_reconcile_ms, during.run_id) == (
        poll.finished_at, poll.duration_ms, run_id)
    run = await agent.wait_run(run_id)
    assert run.outcome == "success", run.message
    assert [(e["type"], e["revision"], e.get("app")) for e in events(agent)[before:]] == [
        ("reconcile.started", rev2, None), ("source.fetched", rev2, None),
        ("app.upgraded", rev2, "web"), ("reconcile.finished", rev2, None)]
    assert agent.status().last_reconcile_ms == run.duration_ms > during.last_reconcile_ms

    # a new revision that changes nothing here still ends in a finished event at that
    # revision: the console counts the node synced there (per-revision series)
    before = len(events(agent))
    repo.write("apps/other.yaml", "name: other\nversion: \"1\"\nnodes: {match: {role: x}}\n")
    rev3 = repo.commit_and_push("an app for other nodes")
    run = await agent.reconcile_now("poll")
    assert [(e["type"], e["revision"], e.get("message")) for e in events(agent)[before:]] == [
        ("reconcile.started", rev3, "poll"), ("source.fetched", rev3, f"main at {rev3[:12]}"),
        ("reconcile.finished", rev3, "no changes")]
    assert rev1 != rev2 != rev3

    # runs skipped on a suspended node are not reconciles: the last one's timing stays
    last = agent.status()
    await agent.suspend()
    assert (await agent.reconcile_now("poll")).outcome == "skipped"
    assert (agent.status().last_reconcile_at, agent.status().last_reconcile_ms) == (
        last.last_reconcile_at, last.last_reconcile_ms)
    await agent.close()  # and a restarted agent reports them until its first run ends
    again = await make_agent(repo)
    assert (again.status().last_reconcile_at, again.status().last_reconcile_ms) == (
        last.last_reconcile_at, last.last_reconcile_ms)


async def test_finished_job_is_not_restarted(repo: SpecRepo, make_agent: MakeAgent) -> None:
    repo.write("apps/job.yaml", textwrap.dedent(f"""\
        name: job
        version: "1"
        run: {{command: [{sys.executable}, -c, "import time; time.sleep(0.3)"]}}
        restart: {{policy: on-failure}}
    """))
    repo.commit_and_push()
    agent = await make_agent(repo)
    assert (await agent.reconcile_now()).outcome == "success"

    def finished() -> bool:
        return "exited with code 0" in agent.store.get_app("job").message  # type: ignore[union-attr]

    await _eventually_async(finished, what="job finished")
    run = await agent.reconcile_now()
    assert (run.outcome, run.message) == ("success", "no changes")
    job = agent.status().apps[0]
    assert (job.phase, job.health, job.message) == (
        "running", "healthy", "exited with code 0 (restart policy on-failure: not restarted)")
    assert agent.status().status == "synced"


def test_redacted_spec_hides_env_values_and_url_credentials() -> None:
    from reconciler.core.redact import redact_spec
    from reconciler.core.spec import AppSpec

    spec = AppSpec.model_validate({
        "name": "a", "version": "1",
        "source": {"type": "archive", "url": "https://user:pw@example.invalid/a.tgz",
                   "sha256": "0" * 64},
        "health": {"http": {"url": "http://user:pw@127.0.0.1:81/health"}},
        "run": {"command": ["serve"], "env": {"TOKEN": "s3cret", "MODE": "prod"}},
    })
    data = redact_spec(spec)
    assert data["run"]["env"] == {"TOKEN": "***", "MODE": "***"}
    assert data["source"]["url"] == "https://example.invalid/a.tgz"
    assert data["health"]["http"]["url"] == "http://127.0.0.1:81/health"
    assert "s3cret" not in json.dumps(data) and "pw" not in json.dumps(data)


DAEMONIZER = """
import os, signal, sys
if os.fork() == 0:
    os.setsid()  # leaves the app's process group and session
    open(os.path.join(sys.argv[1], f"escaped-{os.getpid()}"), "w").close()
    signal.pause()
signal.pause()
"""


async def test_an_escaped_child_survives_nothing_but_its_app(
    repo: SpecRepo, tmp_path: Path
) -> None:
    """Issue #10.5: a child that calls setsid outlived restarts and removal of its app. It is
    kept while its app runs (also across an agent restart) and stopped with it."""
    marks = tmp_path / "marks"
    marks.mkdir()
    repo.write("apps/d.yaml", (
        f"name: d\nversion: '1'\nrun:\n  command: [{sys.executable}, -c, {json.dumps(DAEMONIZER)},"
        f" {marks}]\n  stop_timeout: 2s\n"
    ))
    repo.write("apps/keep.yaml", "name: keep\nversion: '1'\n")
    repo.commit_and_push()

    def live() -> list[int]:
        out = []
        for mark in marks.glob("escaped-*"):
            pid = int(mark.name.split("-")[1])
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
        return out

    config = AgentConfig(node_id="e1", repo_url=repo.url, state_dir=tmp_path / "state",
                         interval=3600, heartbeat=3600)
    first = Agent(config)
    await first.start(first_reconcile=False, schedule=False)
    assert (await first.reconcile_now()).outcome == "success"
    await _eventually_async(lambda: bool(live()), what="the escaped child runs")
    [child] = live()
    await first.close(stop_apps=False)  # the agent goes, the app and its child stay

    second = Agent(config)
    await second.start(first_reconcile=False, schedule=False)
    try:
        assert live() == [child]  # adopted whole: the orphan sweep spared it
        repo.remove("apps/d.yaml")
        repo.commit_and_push("remove d")
        assert (await second.reconcile_now()).outcome == "success"
        assert live() == []
    finally:
        await second.close(stop_apps=True)


@pytest.mark.timeout(60)
def test_env_files_are_bounded_regular_files(tmp_path: Path) -> None:
    from reconciler.node.instances import MAX_ENV_FILE_BYTES, ActionFailed, read_env_file

    fifo = tmp_path / "pipe.env"
    os.mkfifo(fifo)
    big = tmp_path / "big.env"
    big.write_bytes(b"A=" + b"x" * MAX_ENV_FILE_BYTES)
    nul = tmp_path / "nul.env"
    nul.write_bytes(b"A=1\nB=x\0y\n")
    for path, message in [
        (fifo, "not a regular file"),  # never delivers: it hung the reconcile
        (Path("/dev/zero"), "not a regular file"),  # never ends: 2.6 GB in 20 s
        (big, f"larger than {MAX_ENV_FILE_BYTES} bytes"),
        (nul, f"{nul}:2: NUL byte"),
    ]:
        with pytest.raises(ActionFailed, match=message):
            read_env_file(path)


async def test_a_hostile_env_file_fails_its_app_only_and_later_pushes_apply(
    repo: SpecRepo, make_agent: MakeAgent, app_script: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "never.env"
    os.mkfifo(fifo)
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "1", port))
    for name, path in (("zero", "/dev/zero"), ("fifo", str(fifo))):
        repo.write(f"apps/{name}.yaml", (
            f"name: {name}\nversion: '1'\nrun:\n  command: [{sys.executable}, -c, 'pass']\n"
            f"  env_files: [{path}]\n"))
    repo.commit_and_push()
    agent = await make_agent(repo)
    run = await agent.reconcile_now()
    assert run.outcome == "failure"
    assert f"env file {fifo}: not a regular file" in run.message
    assert "env file /dev/zero: not a regular file" in run.message
    phases = {a.name: a.phase for a in agent.status().apps}
    assert phases == {"fifo": "failed", "web": "running", "zero": "failed"}
    repo.write("apps/web.yaml", app_yaml(app_script, "web", "2", port))
    repo.commit_and_push("web 2")
    await agent.reconcile_now()
    assert get(port) == "2 n1"
