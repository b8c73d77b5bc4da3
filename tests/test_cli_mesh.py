"""Fleet CLI end to end: real agents (`gitops-mesh node --nats`), a real nats-server, a bare
spec repo with the shipped post-receive hook, and the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import NatsServer, SpecRepo, eventually, make_spec_repo

import reconciler
from reconciler.mesh.link import NatsOptions, connect
from reconciler.mesh.subjects import EVENTS_STREAM, KV_BUCKET

SECRET = "sup3r-s3cret-v4lue-91"
PY = sys.executable
TESTS = Path(__file__).parent
HOOK = Path(reconciler.__file__).parent / "hooks" / "post-receive"


def web_yaml(version: str, broken: bool = False) -> str:
    code = "import sys; sys.exit(3)" if broken else "import time; time.sleep(3600)"
    # without a probe an app counts as healthy once started; the broken one has a probe
    probe = f"""  exec:
    command: [{json.dumps(PY)}, "-c", "raise SystemExit(1)"]
""" if broken else ""
    return f"""\
name: web
version: "{version}"
run:
  command: [{json.dumps(PY)}, "-c", {json.dumps(code)}]
  env:
    API_KEY: {SECRET}
health:
{probe}  start_timeout: 5s
restart:
  max_restarts: 1
"""


def cli(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "reconciler", *args, "--nats", url], capture_output=True, text=True,
        timeout=timeout, env={k: v for k, v in os.environ.items()
                              if not k.startswith("GITOPS_MESH_")},
    )


@dataclass
class Fleet:
    kind: str  # "real": `gitops-mesh node` agents; "fake": tests/fake_agent.py processes
    url: str
    repo: SpecRepo
    nodes: dict[str, subprocess.Popen[bytes]]
    logs: list[Path]

    @property
    def edge(self) -> str:
        return f"{self.kind}-cm-edge"

    @property
    def gw(self) -> str:
        return f"{self.kind}-cm-gw"

    @property
    def sel(self) -> list[str]:
        """Selector flags for this fleet only (the other kind's nodes share the KV)."""
        return ["--selector", f"fleet={self.kind}"]


def spec_files(version: str, broken: bool = False) -> dict[str, str]:
    """The same change for both agent kinds: apps/web.yaml (real) and apps.json (fake)."""
    return {
        "apps/web.yaml": web_yaml(version, broken),
        "apps.json": json.dumps({"web": {"version": version, "broken": broken}}),
    }


def agent_cmd(kind: str, repo: SpecRepo, node: str, role: str, state: Path, url: str,
              ) -> list[str]:
    if kind == "fake":
        return [PY, str(TESTS / "fake_agent.py"), "--nats", url, "--node-id", node,
                "--state-dir", str(state), "--repo", repo.url, "--label", f"role={role}",
                "--label", f"fleet={kind}"]
    return [PY, "-m", "reconciler", "node", "--repo", repo.url, "--node-id", node,
            "--label", f"role={role}", "--label", f"fleet={kind}", "--state-dir", str(state),
            "--nats", url,
            "--interval", "1h", "--heartbeat", "1s", "--stop-apps-on-exit"]


@pytest.fixture(scope="module", params=["fake", "real"])
def fleet(
    request: pytest.FixtureRequest, nats_server: NatsServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    kind = request.param
    root = tmp_path_factory.mktemp(f"fleet-{kind}")
    repo = make_spec_repo(root / "specs", spec_files("1"))
    hook = repo.bare / "hooks" / "post-receive"
    shutil.copy(HOOK, hook)
    hook.chmod(0o755)
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    for node, role in (("cm-edge", "edge"), ("cm-gw", "gateway")):
        log = open(root / f"{node}.log", "wb")  # noqa: SIM115 - closed with the process
        nodes[node] = subprocess.Popen(
            agent_cmd(kind, repo, f"{kind}-{node}", role, root / node, nats_server.url),
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    fleet = Fleet(kind, nats_server.url, repo,
                  {f"{kind}-{node}": proc for node, proc in nodes.items()},
                  [root / f"{node}.log" for node in nodes])
    try:
        def reported() -> bool:
            for node, proc in fleet.nodes.items():
                if proc.poll() is not None:
                    log_text = (root / f"{node.split('-', 1)[1]}.log").read_text()
                    pytest.fail(f"{node} exited: {log_text[-2000:]}")
            table = cli(nats_server.url, "status")
            return all(node in table.stdout for node in fleet.nodes)

        eventually(reported, timeout=30, what="both agents report to the KV")
        yield fleet
    finally:
        for proc in nodes.values():
            proc.send_signal(signal.SIGTERM)
        for proc in nodes.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def push(fleet: Fleet, files: dict[str, str], message: str) -> str:
    """Commit and push through the bare repo's post-receive hook, which runs `notify`."""
    for path, text in files.items():
        fleet.repo.write(path, text)
    env = {"GITOPS_MESH_NATS": fleet.url, "GITOPS_MESH_BIN": f"{PY} -m reconciler"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fleet.repo.commit_and_push(message)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_wait_succeeds_after_a_good_push_announced_by_the_hook(fleet: Fleet) -> None:
    edge, gw = fleet.edge, fleet.gw
    first = fleet.repo.head()
    done = cli(fleet.url, "wait", "--revision", first[:10], *fleet.sel, "--timeout", "60s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{first[:10]}: synced on 2 node(s): {edge}, {gw}"

    # the nodes poll once an hour: only the hook's notify can bring them to the push
    second = push(fleet, spec_files("2"), "web 2")
    done = cli(fleet.url, "wait", "--revision", second, *fleet.sel, "--selector", "role=edge",
               "--timeout", "30s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{second[:12]}: synced on 1 node(s): {edge}"
    done = cli(fleet.url, "wait", "--revision", second, "--node", gw, "--timeout", "30s")
    assert done.returncode == 0, done.stderr


def test_wait_is_not_fooled_by_a_node_still_at_the_old_revision(fleet: Fleet) -> None:
    edge = fleet.edge
    # a commit the nodes have not heard of (pushed without the hook): synced, but at the old one
    fleet.repo.write("apps/note.txt", "not announced")
    unannounced = fleet.repo.commit_and_push("no hook env")
    done = cli(fleet.url, "wait", "--revision", unannounced, "--node", edge, "--timeout", "1s")
    assert done.returncode == 2  # timed out (1 is kept for a node that failed)
    assert f"{edge}: not synced at {unannounced[:12]}" in done.stderr
    assert "synced at" in done.stderr  # says where it is instead
    ran = cli(fleet.url, "reconcile", "--node", edge)
    assert ran.returncode == 0, ran.stderr
    node, run_id = ran.stdout.split()
    assert node == edge and len(run_id) >= 8
    done = cli(fleet.url, "wait", "--revision", unannounced, "--node", edge, "--timeout", "30s")
    assert done.returncode == 0, done.stderr


def test_wait_fails_naming_the_node_of_a_broken_push(fleet: Fleet) -> None:
    edge, gw = fleet.edge, fleet.gw
    broken = push(fleet, spec_files("3", broken=True), "web 3 crashes")
    done = cli(fleet.url, "wait", "--revision", broken, *fleet.sel, "--timeout", "60s")
    assert done.returncode == 1
    assert f"{edge}: failed at {broken[:12]}:" in done.stderr
    assert f"{gw}: failed at {broken[:12]}:" in done.stderr
    assert "web" in done.stderr  # the node's message names the app
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"gitops-mesh: {broken[:12]}: 0 synced, not synced: {edge}, {gw}"


def test_status_and_reconcile_commands(fleet: Fleet) -> None:
    edge, gw = fleet.edge, fleet.gw
    table = cli(fleet.url, "status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["NODE", "STATUS", "REVISION", "APPS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert {edge, gw} <= set(rows)
    assert rows[edge][1] != "unreachable"
    one = cli(fleet.url, "status", "--node", gw, "--json")
    assert one.returncode == 0, one.stderr
    data = json.loads(one.stdout)
    assert data["node"] == gw and data["labels"] == {"fleet": fleet.kind, "role": "gateway"}
    assert data["heartbeat_interval_s"] == 1.0
    human = cli(fleet.url, "status", "--node", edge)
    assert human.stdout.startswith(f"node {edge}  [fleet={fleet.kind},role=edge]")
    missing = cli(fleet.url, "status", "--node", "nobody")
    assert missing.returncode == 1
    assert "node 'nobody' is not answering" in missing.stderr

    sel = cli(fleet.url, "reconcile", *fleet.sel, "--selector", "role=gateway", "--json")
    assert sel.returncode == 0, sel.stderr
    assert [r["node"] for r in json.loads(sel.stdout)] == [gw]
    every = cli(fleet.url, "reconcile", "--all", "--timeout", "10s")
    assert {line.split()[0] for line in every.stdout.splitlines()} >= {edge, gw}
    silent = cli(fleet.url, "reconcile", "--node", "nobody")
    assert silent.returncode == 1
    assert silent.stderr == "gitops-mesh: node 'nobody' is not answering (no responders)\n"
    none = cli(fleet.url, "reconcile", "--selector", "role=nothing", "--timeout", "0.3s")
    assert none.returncode == 1
    assert "no node answered (selector: role=nothing)" in none.stderr


def test_secrets_never_reach_the_stream_the_kv_or_rpc(fleet: Fleet) -> None:
    async def everything_published() -> bytes:
        nc = await connect(NatsOptions(servers=[fleet.url]))
        js = nc.jetstream()
        blob = b""
        sub = await js.subscribe("gitops.events.>", ordered_consumer=True)
        info = await js.stream_info(EVENTS_STREAM)
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=5)
            blob += msg.data + json.dumps(dict(msg.headers or {})).encode()
        kv = await js.key_value(KV_BUCKET)
        for node in fleet.nodes:
            for entry in await kv.history(node):
                blob += entry.value or b""
            for endpoint in ("status", "state", "plan"):
                blob += (await nc.request(f"gitops.rpc.{node}.{endpoint}", b"", timeout=10)).data
        await nc.close()
        return blob

    blob = asyncio.run(everything_published())
    assert b'"app.deployed"' in blob
    if fleet.kind == "real":
        assert b"API_KEY" in blob  # the env keys are there (state, plan)...
    assert SECRET.encode() not in blob  # ...but never the env value
    for log in fleet.logs:  # nor in the agents' own logs (mesh included)
        assert SECRET not in log.read_text(errors="replace"), log


def test_bad_flags_are_usage_errors(nats_server: NatsServer) -> None:
    res = cli(nats_server.url, "wait", "--revision", "abc", "--timeout", "soon")
    assert (res.returncode, res.stderr) == (
        2, "gitops-mesh: --timeout: invalid duration 'soon': use e.g. '500ms', '5s', '2m', '1h'\n"
    )
    res = cli(nats_server.url, "reconcile", "--selector", "role")
    assert (res.returncode, res.stderr) == (
        2, "gitops-mesh: --selector 'role': expected KEY=VALUE, e.g. role=gateway\n"
    )


def test_notify_without_nats_fails_clearly_and_the_hook_never_fails_a_push(
    tmp_path: Path,
) -> None:
    bad = "nats://127.0.0.1:1"
    res = cli(bad, "notify", "--repo", "/x", "--branch", "main", "--revision", "abc")
    assert res.returncode == 2
    assert res.stderr.startswith(f"gitops-mesh: cannot connect to NATS at {bad}:")
    repo = make_spec_repo(tmp_path / "specs")
    hook = repo.bare / "hooks" / "post-receive"
    shutil.copy(HOOK, hook)
    hook.chmod(0o755)
    repo.write("a.txt", "x")
    os.environ["GITOPS_MESH_NATS"] = bad
    try:
        repo.commit_and_push("push while NATS is down")  # check=True: the push succeeds
    finally:
        os.environ.pop("GITOPS_MESH_NATS")


def test_hook_announces_each_updated_branch_only(tmp_path: Path) -> None:
    """The hook's own logic: branches only (no tags, no deletions), repo = its real path."""
    record = tmp_path / "calls"
    fake_cli = tmp_path / "fake-gitops-mesh"
    fake_cli.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    fake_cli.chmod(0o755)
    bare = tmp_path / "specs.git"
    bare.mkdir()
    zero, a, b = "0" * 40, "a" * 40, "b" * 40
    stdin = (f"{zero} {a} refs/heads/main\n{a} {b} refs/heads/feature/x\n"
             f"{zero} {a} refs/tags/v1\n{a} {zero} refs/heads/gone\n")
    env = {"PATH": os.environ["PATH"], "GITOPS_MESH_NATS": "nats://127.0.0.1:1",
           "GITOPS_MESH_BIN": str(fake_cli)}
    done = subprocess.run([str(HOOK)], input=stdin, cwd=bare, env=env, text=True,
                          capture_output=True, check=True)
    assert done.stderr == ""
    repo = str(bare.resolve())
    assert record.read_text().splitlines() == [
        f"notify --repo {repo} --branch main --revision {a}",
        f"notify --repo {repo} --branch feature/x --revision {b}",
    ]
    # without GITOPS_MESH_NATS the hook does nothing (and never fails the push)
    record.unlink()
    subprocess.run([str(HOOK)], input=stdin, cwd=bare, text=True, check=True,
                   env={"PATH": os.environ["PATH"], "GITOPS_MESH_BIN": str(fake_cli)})
    assert not record.exists()


def test_status_of_a_stopped_node_comes_from_the_kv_and_turns_unreachable(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    node = "gone-node"
    proc = subprocess.Popen(
        [PY, str(TESTS / "fake_agent.py"), "--nats", nats_server.url, "--node-id", node,
         "--state-dir", str(tmp_path / "state"), "--heartbeat", "0.2"],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    eventually(lambda: cli(nats_server.url, "status", "--node", node).returncode == 0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)

    def unreachable() -> dict[str, object]:
        done = cli(nats_server.url, "status", "--node", node, "--json")
        assert done.returncode == 0, done.stderr  # answered from the KV: RPC is gone
        data: dict[str, object] = json.loads(done.stdout)
        assert data["status"] == "unreachable", data["status"]
        return data

    data = eventually(unreachable, timeout=15, interval=0.2)
    assert data["node"] == node and data["heartbeat_interval_s"] == 0.2
    table = cli(nats_server.url, "status")
    row = next(line.split() for line in table.stdout.splitlines() if line.startswith(node))
    assert row[1] == "unreachable"
