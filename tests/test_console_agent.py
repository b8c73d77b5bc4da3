"""The console with a real agent (`gitops-mesh node` subprocess): status, events, a rollout
triggered from the console's fleet reconcile action, and no secret anywhere in the API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sim

from console.app import ConsoleConfig
from tests.conftest import NatsServer, SpecRepo, eventually, free_port, make_spec_repo

PY = sys.executable
TOKEN = "agent-test-token"
SECRET = "sup3r-secret-api-key-9731"
NODE = "console-real-1"


def web_yaml(version: str) -> str:
    return f"""\
name: web
version: "{version}"
layer: frontend
run:
  command: [{json.dumps(PY)}, "-c", "import time; time.sleep(3600)"]
  env:
    API_KEY: {SECRET}
health:
  start_timeout: 5s
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> SpecRepo:
    return make_spec_repo(tmp_path_factory.mktemp("specs"), {"apps/web.yaml": web_yaml("1")})


@pytest.fixture(scope="module")
def agent(nats_server: NatsServer, repo: SpecRepo,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    state = tmp_path_factory.mktemp("agent")
    log = open(state / "agent.log", "wb")  # noqa: SIM115 - closed with the process
    env = {k: v for k, v in os.environ.items() if not k.startswith("GITOPS_MESH_")}
    proc = subprocess.Popen(
        [PY, "-m", "reconciler", "node", "--repo", repo.url, "--node-id", NODE,
         "--label", "role=edge", "--state-dir", str(state / "state"), "--nats",
         nats_server.url, "--interval", "1h", "--heartbeat", "1s", "--stop-apps-on-exit"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    yield proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    if proc.returncode not in (0, -signal.SIGTERM):
        print(Path(state / "agent.log").read_text()[-3000:])


@pytest.fixture(scope="module")
def http(nats_server: NatsServer) -> Iterator[httpx.Client]:
    console = sim.ConsoleThread(ConsoleConfig(token=TOKEN, fleet_window=1.0),
                                sim.connector_for(nats_server.url), free_port()).start()
    with httpx.Client(base_url=console.url, timeout=15) as client:
        yield client
    console.stop()


def node_view(http: httpx.Client) -> Any:
    res = http.get(f"/api/nodes/{NODE}")
    assert res.status_code == 200, res.text
    return res.json()


def test_console_follows_a_real_agent_and_drives_a_rollout(
        agent: subprocess.Popen[bytes], repo: SpecRepo, http: httpx.Client) -> None:
    first = repo.head()

    def synced_at(revision: str) -> Any:
        assert agent.poll() is None, "the agent exited"
        view = node_view(http)
        card = view["card"]
        assert (card["status"], card["revision"]) == ("synced", revision), card
        return view

    view = eventually(lambda: synced_at(first), timeout=60, what="agent synced in the console")
    app = view["status"]["apps"][0]
    assert (app["name"], app["version"], app["phase"], app["layer"]) == (
        "web", "1", "running", "frontend")
    assert "reconcile.finished" in {e["type"] for e in view["events"]}
    assert http.get("/api/nodes?label=role=edge").json()[0]["node"] == NODE

    # a push, then the console's fleet reconcile action starts the rollout at once
    repo.write("apps/web.yaml", web_yaml("2"))
    second = repo.commit_and_push("web 2")
    res = http.post("/api/fleet/reconcile", json={"selector": {"match": {"role": "edge"}}},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert res.status_code == 200, res.text
    replies = res.json()["replies"]
    assert [r["node"] for r in replies] == [NODE] and replies[0]["run_id"]

    def rolled_out() -> Any:
        rollout = http.get(f"/api/rollouts/{second[:10]}").json()
        assert (rollout.get("revision"), rollout.get("progress")) == (second, 1.0), rollout
        return rollout

    rollout = eventually(rolled_out, timeout=60, what="the rollout of web 2 completes")
    assert rollout["nodes"]["synced"] == [NODE]
    assert http.get("/api/apps/web").json()["versions"] == {"2": 1}

    # status (KV) and events (stream) arrive separately: the events may trail the status
    def superseded() -> bool:
        # the first revision was superseded: it still shows how it went, and by what
        before = http.get(f"/api/rollouts/{first}").json()
        assert (before["superseded_by"], before["nodes"]["synced"], before["from_events"],
                before["progress"]) == (second, [NODE], [NODE], 1.0), before
        upgraded = http.get(f"/api/events?node={NODE}&type=app.upgraded").json()
        assert [(e["app"], e["from_version"], e["version"]) for e in upgraded] == [
            ("web", "1", "2")]
        return True

    eventually(superseded, timeout=10, what="the rollout of web 1 shows it was superseded")

    # the node's RPC answers the console's per-node actions
    res = http.post(f"/api/nodes/{NODE}/health", json={"app": "web"},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert res.status_code == 200, res.text

    # the spec's env value reached the app, but nothing the console serves contains it
    for path in ("/api/fleet", f"/api/nodes/{NODE}", "/api/apps/web", "/api/events?limit=5000",
                 f"/api/rollouts/{second}", f"/nodes/{NODE}"):
        assert SECRET not in http.get(path).text, path
