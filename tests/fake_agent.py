"""A small real AgentAPI for mesh tests: reads `apps.json` from a git repo, keeps events in a
real reconciler.node.store.Store outbox. It runs no processes; "broken": true makes an app fail.

Also runnable as a process (`python tests/fake_agent.py --nats URL ...`) for kill -9 tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler.core.events import iso_time, make_event
from reconciler.core.plan import Action, ActionKind, Mode, Plan
from reconciler.core.status import AppStatus, NodeStatus
from reconciler.node.logtail import read_log
from reconciler.node.store import Store


class FakeAgent:
    def __init__(
        self,
        store: Store,
        node_id: str,
        labels: dict[str, str] | None = None,
        repo_url: str = "",
        branch: str = "main",
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.labels = dict(labels or {})
        self.repo_url = repo_url
        self.branch = branch
        self.apps: dict[str, AppStatus] = {}
        self.revision: str | None = None
        self.desired_revision: str | None = None
        self.suspended = False
        self.reconciling = False
        self.triggers: list[str] = []
        self.runs = 0
        self._listeners: list[Callable[[], None]] = []
        self._run_id: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._again = False

    # -- AgentAPI -----------------------------------------------------------------------
    def status(self) -> NodeStatus:
        backlog, dropped = self.store.outbox_stats()
        failed = sorted(a.name for a in self.apps.values() if a.phase == "failed")
        if self.suspended:
            state, message = "suspended", "suspended"
        elif self.reconciling:
            state, message = "progressing", "reconciling"
        elif failed:
            state, message = "failed", "failed: " + ", ".join(failed)
        else:
            state, message = "synced", "all apps running and healthy"
        return NodeStatus(
            node=self.node_id, labels=self.labels, revision=self.revision,
            desired_revision=self.desired_revision, status=state, message=message,
            apps=[a.model_copy() for a in self.apps.values()],
            updated_at=iso_time(datetime.now(UTC)), agent_version="fake",
            outbox_backlog=backlog, outbox_dropped=dropped,
        )

    def state(self) -> dict[str, Any]:
        return {"desired": {"revision": self.desired_revision},
                "current": {n: {"version": a.version} for n, a in self.apps.items()}}

    async def plan(self) -> Plan:
        rev, spec = await asyncio.to_thread(self._read_spec)
        actions = tuple(
            Action(ActionKind.DEPLOY, name, 0, "new app", to_version=str(app["version"]),
                   mode=Mode.INSTALL)
            for name, app in sorted(spec.items()) if name not in self.apps
        )
        return Plan(revision=rev, actions=actions)

    def trigger(self, reason: str) -> str:
        self.triggers.append(reason)
        if self._task is not None and not self._task.done():
            self._again = True  # coalesce: one more run after the current one
            assert self._run_id
            return self._run_id
        self._run_id = uuid.uuid4().hex[:12]
        self._task = asyncio.get_running_loop().create_task(self._reconcile(self._run_id))
        return self._run_id

    async def check_health(self, app: str | None = None) -> dict[str, str]:
        return {n: a.health for n, a in self.apps.items() if app is None or n == app}

    async def suspend(self, app: str | None = None) -> None:
        self._set_suspended(app, True)

    async def resume(self, app: str | None = None) -> None:
        self._set_suspended(app, False)

    async def logs(self, app: str, lines: int, cursor: str | None = None) -> dict[str, Any]:
        """Reads `<state dir>/logs/<app>.log` as the real agent does (tests write it)."""
        log_dir = self.store.state_dir / "logs"
        return read_log(log_dir, app, lines, cursor).to_json(self.node_id, app)

    def add_listener(self, on_change: Callable[[], None]) -> None:
        self._listeners.append(on_change)

    # -- behaviour ----------------------------------------------------------------------
    def record(self, type: str, **fields: Any) -> None:
        event = make_event(type, self.node_id, datetime.now(UTC), **fields)
        with self.store.transaction():
            self.store.add_event(event)
        self.changed()

    def changed(self) -> None:
        for listener in self._listeners:
            listener()

    def _set_suspended(self, app: str | None, value: bool) -> None:
        if app is None:
            self.suspended = value
        else:
            self.apps[app].suspended = value
        self.record("app.suspended" if value else "app.resumed", app=app)

    def _read_spec(self) -> tuple[str, dict[str, Any]]:
        rev = subprocess.run(
            ["git", "rev-parse", self.branch], cwd=self.repo_url, check=True,
            capture_output=True, text=True,
        ).stdout.strip()
        shown = subprocess.run(
            ["git", "show", f"{rev}:apps.json"], cwd=self.repo_url, capture_output=True,
            text=True,
        )
        return rev, (json.loads(shown.stdout) if shown.returncode == 0 else {})

    async def _reconcile(self, run_id: str) -> None:
        while True:
            self._again = False
            self.runs += 1
            self.reconciling = True
            self.record("reconcile.started", run_id=run_id)
            if self.repo_url and Path(self.repo_url, "HEAD").exists():
                rev, spec = await asyncio.to_thread(self._read_spec)
                self.desired_revision = rev
                self.record("source.fetched", revision=rev, run_id=run_id)
                for name, app in sorted(spec.items()):
                    version = str(app["version"])
                    broken = bool(app.get("broken"))
                    self.apps[name] = AppStatus(
                        name=name, version=version,
                        phase="failed" if broken else "running",
                        health="unhealthy" if broken else "healthy",
                        message="exit status 1" if broken else "",
                    )
                    self.record("app.failed" if broken else "app.deployed", app=name,
                                version=version, revision=rev, run_id=run_id)
                self.revision = rev
            self.reconciling = False
            self.record("reconcile.finished", run_id=run_id, revision=self.revision,
                        outcome="success")
            if not self._again:
                return


async def _main(argv: list[str]) -> None:
    """Run a FakeAgent + Mesh; `--emit N` records N events at start (a backlog)."""
    from reconciler.mesh.link import Mesh, NatsOptions

    parser = argparse.ArgumentParser()
    parser.add_argument("--nats", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--emit", type=int, default=0)
    parser.add_argument("--repo", default="")
    parser.add_argument("--branch", default="main")
    parser.add_argument("--label", action="append", default=[])
    parser.add_argument("--heartbeat", type=float, default=1.0)
    args = parser.parse_args(argv)
    store = Store(Path(args.state_dir))
    labels = dict(item.split("=", 1) for item in args.label)
    agent = FakeAgent(store, args.node_id, labels, repo_url=args.repo, branch=args.branch)
    for i in range(args.emit):
        agent.record("app.health-changed", app="a", message=f"emit {i}")
    mesh = Mesh(agent, store, NatsOptions(servers=[args.nats]),
                heartbeat=args.heartbeat)
    await mesh.start()
    if args.repo:
        agent.trigger("startup")
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await mesh.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
