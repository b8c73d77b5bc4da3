"""SIGHUP reloads a running `gitops-mesh node`'s config (labels, interval, log level, NATS)
without touching its apps; a config that does not validate is refused and the old one kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import NatsServer, eventually, make_spec_repo, start_nats, stop_processes

from reconciler.cli.node_cmds import local_status
from reconciler.node.store import StoreError

PY = sys.executable
SECRET = "hup-pa55word-8812"
SLEEPER = "import signal; signal.pause()"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "reconciler", *args], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items()
                                           if not k.startswith("GITOPS_MESH_")})


def kv_status(url: str, node: str) -> dict[str, Any] | None:
    done = cli("status", "--nats", url, "--json")
    rows = [r for r in json.loads(done.stdout or "[]") if r["node"] == node]
    return rows[0] if rows else None


def node_events(url: str, node: str, type: str) -> list[dict[str, Any]]:
    """Events of `node` of `type` from the stream (read with a plain subscriber)."""
    script = f"""
import asyncio, json, nats
async def main():
    nc = await nats.connect({url!r})
    js = nc.jetstream()
    sub = await js.subscribe("gitops.events.{node}.{type}", ordered_consumer=True)
    out = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            out.append(json.loads(msg.data))
    except Exception:
        pass
    print(json.dumps(out))
    await nc.close()
asyncio.run(main())
"""
    done = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=30)
    return json.loads(done.stdout or "[]")


@pytest.fixture
def node(tmp_path: Path, nats_server: NatsServer) -> Iterator[dict[str, Any]]:
    repo = make_spec_repo(tmp_path / "specs", {"apps/sleeper.yaml": (
        f"name: sleeper\nversion: \"1\"\nrun:\n  command: [{json.dumps(PY)}, \"-c\", "
        f"{json.dumps(SLEEPER)}]\n")})
    config = tmp_path / "node.yaml"
    settings: dict[str, Any] = {
        "repo": repo.url, "node_id": "hup1", "state_dir": str(tmp_path / "state"),
        "label": {"role": "edge"}, "interval": "1h", "heartbeat": "1s",
        "nats": nats_server.url, "stop_apps_on_exit": True,
    }
    config.write_text(yaml.safe_dump(settings))
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([PY, "-m", "reconciler", "--config", str(config), "node"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        def synced() -> bool:
            try:
                status = local_status(tmp_path / "state")
            except StoreError:  # the agent is still creating its store
                return False
            return status is not None and status.status == "synced" and bool(status.apps) \
                and status.apps[0].pid is not None
        eventually(synced, timeout=60, what="the node runs its app")
        yield {"proc": proc, "config": config, "settings": settings, "log": log,
               "state": tmp_path / "state", "url": nats_server.url, "tmp": tmp_path,
               "repo": repo}
    finally:
        stop_processes(proc)


def app_pid(state: Path) -> int | None:
    status = local_status(state)
    return status.apps[0].pid if status and status.apps else None


def reload(node: dict[str, Any], **changes: Any) -> None:
    node["settings"].update(changes)
    node["config"].write_text(yaml.safe_dump(node["settings"]))
    node["proc"].send_signal(signal.SIGHUP)


def test_sighup_reloads_labels_and_log_level_without_touching_apps(
    node: dict[str, Any],
) -> None:
    proc, state, url = node["proc"], node["state"], node["url"]
    pid = app_pid(state)
    assert pid is not None
    reload(node, label={"role": "gateway", "site": "b"}, log_level="debug", interval="2s")

    def relabelled() -> bool:
        assert proc.poll() is None, f"the agent exited on SIGHUP ({proc.returncode})"
        status = local_status(state)
        kv = kv_status(url, "hup1")
        return bool(status and status.labels == {"role": "gateway", "site": "b"}
                    and kv and kv["labels"] == {"role": "gateway", "site": "b"})
    eventually(relabelled, timeout=20, what="the new labels in status --state-dir and the KV")
    assert proc.poll() is None, node["log"].read_text()[-2000:]
    assert app_pid(state) == pid  # the app was not touched
    events = eventually(lambda: node_events(url, "hup1", "node.reconfigured"), timeout=20)
    assert events[-1]["data"] == {"changed": ["interval", "label", "log_level"]}
    assert events[-1]["outcome"] == "success"
    log = node["log"].read_text()
    assert "reloaded the config" in log and "label" in log
    assert " DEBUG " in log  # the new level is in force
    # the poll runs every 2 s now (it was 1 h): an unannounced commit is picked up
    node["repo"].write("apps/README", "not an app")
    revision = node["repo"].commit_and_push("a commit nobody announces")
    eventually(lambda: (s := local_status(state)) and s.revision == revision, timeout=20,
               what="the new interval's poll reaches the commit")
    assert app_pid(state) == pid


def test_a_config_that_does_not_validate_keeps_the_old_one(node: dict[str, Any]) -> None:
    proc, state, url = node["proc"], node["state"], node["url"]
    pid = app_pid(state)
    reload(node, interval="soon", label={"role": "gateway"})
    events = eventually(lambda: node_events(url, "hup1", "node.reconfigured"), timeout=20)
    assert events[-1]["outcome"] == "failure"
    assert "--interval" in events[-1]["message"] and "kept" in events[-1]["message"]
    assert "--interval" in node["log"].read_text()
    assert proc.poll() is None
    status = local_status(state)
    assert status is not None and status.labels == {"role": "edge"}
    assert app_pid(state) == pid
    # a later good config applies
    reload(node, interval="1h")
    eventually(lambda: (s := local_status(state)) and s.labels == {"role": "gateway"},
               timeout=20, what="the fixed config applied")
    assert app_pid(state) == pid


def test_new_nats_settings_reconnect_and_secrets_stay_out(node: dict[str, Any]) -> None:
    proc, state = node["proc"], node["state"]
    pid = app_pid(state)
    other = start_nats(node["tmp"] / "other")
    try:
        # a server without authorization accepts any user/password: enough to see the secret
        reload(node, nats=other.url, nats_user="agent", nats_password=SECRET)
        eventually(lambda: kv_status(other.url, "hup1"), timeout=30,
                   what="the node reports to the new server")
        events = eventually(lambda: node_events(other.url, "hup1", "node.reconfigured"),
                            timeout=20)
        assert events[-1]["data"] == {"changed": ["nats", "nats_password", "nats_user"]}
        assert SECRET not in json.dumps(events)
        assert SECRET not in node["log"].read_text()
        assert proc.poll() is None and app_pid(state) == pid
    finally:
        other.stop()


def test_what_a_reload_reports_never_shows_a_secret() -> None:
    from reconciler.cli.main import parse_args
    from reconciler.cli.node_cmds import agent_config, config_changes, describe_changes

    base = ["node", "--repo", "/r", "--node-id", "d1", "--label", "a=1"]
    old = parse_args(base)
    new = parse_args([*base[:-1], "b=2", "--nats", f"nats://u:{SECRET}@h:4222",
                      "--nats-token", SECRET, "--heartbeat", "5s"])
    changed, restart = config_changes(old, agent_config(old), new, agent_config(new))
    assert sorted(changed) == ["label", "nats", "nats_token"] and restart == ["heartbeat"]
    text = describe_changes(changed, restart)
    assert SECRET not in text
    assert text == ("label a=1 -> b=2; nats - -> nats://h:4222; nats_token changed "
                    "(heartbeat: kept, a restart applies them)")
