"""`status --state-dir`: a node's status from its store alone, whether its agent runs or not
(the agent itself is not loaded)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from datetime import UTC, datetime
from pathlib import Path

import psutil

from reconciler.cli.main import DEFAULT_STATE_DIR
from reconciler.cli.render import format_status
from reconciler.core.status import NodeMeta, NodeStatus, node_status
from reconciler.node.runtimes.process import pid_alive
from reconciler.node.status_view import record_facts
from reconciler.node.store import StoreError, read_snapshot


def local_status(state_dir: Path) -> NodeStatus | None:
    """A node's status from its store alone (agent running or not); None without a store.
    Liveness comes from the recorded pids (/proc, create_time checked). agent_version and
    the last reconcile's time and duration are what the last agent on this store recorded;
    cpu_percent stays None (it needs a running agent's samples). Built by the same
    core.status.node_status as the agent's own status."""
    snap = read_snapshot(state_dir)
    if snap is None:
        return None
    now = datetime.now(UTC)
    apps = []
    for record in snap.apps.values():
        spec = record.spec
        alive = spec.run is None or pid_alive(record.pid, record.create_time)
        pid = record.pid if alive and spec.run is not None else None
        uptime = rss = None
        if pid is not None and record.create_time is not None:
            uptime = now.timestamp() - record.create_time
            with contextlib.suppress(psutil.Error):
                rss = psutil.Process(pid).memory_info().rss
        apps.append(record_facts(
            record, spec, alive=alive, pid=pid,
            started_at=record.create_time if pid is not None else None,
            uptime_s=uptime, rss_bytes=rss,
        ))
    return node_status(NodeMeta.from_rows(snap.meta), apps, now=now,
                       outbox_backlog=snap.outbox_backlog)


def run_status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir or DEFAULT_STATE_DIR)
    try:
        status = local_status(state_dir)
    except (StoreError, OSError) as exc:
        print(f"gitops-mesh status: {exc}", file=sys.stderr)
        return 1
    if status is None:
        print(f"gitops-mesh status: no agent state in {state_dir} "
              "(give --state-dir, or --nats URL --node ID for a remote node)", file=sys.stderr)
        return 1
    if args.json:
        print(status.model_dump_json(indent=2))
    else:
        print(format_status(status))
    return 0
