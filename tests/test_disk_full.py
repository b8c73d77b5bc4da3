"""A full disk under the state dir (a real tmpfs): the node says so, keeps its apps running,
starts at all, and recovers by itself once there is room (issue #10.4)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SpecRepo, eventually_async, free_port, make_spec_repo
from test_agent import APP_SCRIPT, app_yaml, get

from reconciler.node.agent import Agent, AgentConfig

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte; returns the filler to delete later."""
    filler = disk / "filler"
    for chunk in (b"\0" * 65536, b"\0"):  # then the last partial block
        with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as out:
            while True:
                out.write(chunk)
    return filler


async def _async(value: object) -> object:
    return value


async def test_a_full_disk_is_reported_keeps_apps_and_passes(
    small_disk: Path, tmp_path: Path
) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP_SCRIPT)
    repo: SpecRepo = make_spec_repo(tmp_path / "specs")
    port = free_port()
    repo.write("apps/web.yaml", app_yaml(script, "web", "1", port))
    repo.commit_and_push()
    config = AgentConfig(node_id="d1", repo_url=repo.url, state_dir=small_disk / "state",
                         interval=3600, heartbeat=3600)
    agent = Agent(config)
    await agent.start(first_reconcile=False, schedule=False)
    try:
        assert (await agent.reconcile_now()).outcome == "success"
        pid = agent.status().apps[0].pid
        filler = fill(small_disk)

        repo.write("apps/web.yaml", app_yaml(script, "web", "2", port))
        repo.commit_and_push("web 2")
        run = await agent.reconcile_now()
        assert run.outcome == "failure" and "full" in run.message
        status = agent.status()
        assert status.status == "degraded" and "state store" in status.message, status.message
        assert (get(port), status.apps[0].pid) == ("1 d1", pid)  # untouched

        await agent.close(stop_apps=False)  # an agent restart on the full disk works too
        agent = Agent(config)
        await agent.start(first_reconcile=False, schedule=False)
        assert agent.status().status == "degraded"
        assert (await agent.reconcile_now()).outcome == "failure"
        assert get(port) == "1 d1"

        filler.unlink()  # room again: the agent's own retry applies web 2
        await eventually_async(lambda: _async(agent.status().status == "synced"),
                               timeout=20, what="synced after the disk has room")
        assert get(port) == "2 d1"
    finally:
        await agent.close(stop_apps=True)
