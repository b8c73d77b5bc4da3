"""`node` (run the agent) and local `status --state-dir` commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler.spec import parse_duration
from reconciler.status import AppStatus, NodeStatus, summarize

log = logging.getLogger(__name__)


class UsageError(Exception):
    """A bad option value: printed as one line, exit code 2."""


def _duration(args: argparse.Namespace, name: str) -> float:
    value = getattr(args, name)
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"--{name.replace('_', '-')}: {exc}") from None


def _labels(pairs: list[str]) -> dict[str, str]:
    from reconciler.targeting import parse_labels

    try:
        return parse_labels(pairs)
    except ValueError as exc:
        raise UsageError(f"--label: {exc}") from None


def _existing_file(value: str | None, flag: str) -> Path | None:
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"{flag}: {value}: no such file")
    return path


def agent_config(args: argparse.Namespace) -> Any:
    from reconciler.agent import AgentConfig
    from reconciler.spec import NAME_RE

    if not NAME_RE.match(args.node_id):
        raise UsageError(f"--node-id: {args.node_id!r} is not a valid node id "
                         "(lowercase letters, digits and '-', at most 63)")
    interval = _duration(args, "interval")
    if interval <= 0:
        raise UsageError("--interval: must be more than 0")
    return AgentConfig(
        node_id=args.node_id, repo_url=args.repo, state_dir=Path(args.state_dir),
        labels=_labels(args.label), branch=args.branch, apps_path=args.path,
        interval=interval, heartbeat=_duration(args, "heartbeat"),
        fetch_timeout=_duration(args, "fetch_timeout"), port_offset=args.port_offset,
        outbox_max=args.outbox_max,
        allowed_signers=_existing_file(args.allowed_signers, "--allowed-signers"),
        gpg_keyring=_existing_file(args.gpg_keyring, "--gpg-keyring"),
    )


def run_node(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM/SIGINT; with --once one reconcile, exit 0 when synced."""
    try:
        config = agent_config(args)
    except UsageError as exc:
        print(f"gitops-mesh node: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_node(args, config))


async def _node(args: argparse.Namespace, config: Any) -> int:
    from reconciler.agent import Agent, StateDirBusy
    from reconciler.errors import ReconcileError
    from reconciler.store import StoreError

    try:
        agent = Agent(config)
    except (StoreError, StateDirBusy, ReconcileError, ValueError, OSError) as exc:
        print(f"gitops-mesh node: {exc}", file=sys.stderr)
        return 1
    mesh = None
    if getattr(args, "nats", None):
        try:
            from reconciler.bus import Mesh, NatsOptions
        except ImportError as exc:  # the mesh is optional: the node still reconciles
            log.error("--nats given but the mesh is unavailable: %s", exc)
        else:
            mesh = Mesh(agent=agent, outbox=agent.store, options=NatsOptions.from_args(args),
                        heartbeat=config.heartbeat)
            await mesh.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        if args.once:
            await agent.start(first_reconcile=False, schedule=False)
            run = asyncio.ensure_future(agent.reconcile_now("once"))
            waiter = asyncio.ensure_future(stop.wait())
            await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not run.done():
                run.cancel()
                code = 130
            else:
                status = agent.status()
                code = 0 if status.status == "synced" else 1
                print_problems(status, sys.stdout if code == 0 else sys.stderr)
        else:
            await agent.start()
            await stop.wait()
            log.info("stopping (apps %s)", "stopped" if args.stop_apps_on_exit else "left running")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if mesh is not None:
            with contextlib.suppress(Exception):
                await mesh.close()
        await agent.close(stop_apps=args.stop_apps_on_exit)
    return code


def print_problems(status: NodeStatus, out: Any) -> None:
    print(f"{status.node}: {status.status} at {(status.revision or '-')[:12]}: "
          f"{status.message}", file=out)
    if status.source_error:
        print(f"  source: {status.source_error}", file=out)
    for error in status.spec_errors:
        print(f"  {error}", file=out)
    for app in status.apps:
        if app.phase != "running" or app.health == "unhealthy" or app.failed_version:
            print(f"  {app.name} {app.version}: {app.phase}/{app.health}: {app.message}",
                  file=out)


# -- status --------------------------------------------------------------------------------

def local_status(state_dir: Path) -> NodeStatus | None:
    """A node's status from its store alone (agent running or not); None without a store.
    Liveness comes from the recorded pids (/proc, create_time checked). agent_version and
    the last reconcile's time and duration are what the last agent on this store recorded;
    cpu_percent stays None (it needs a running agent's samples)."""
    import psutil

    from reconciler.agent import spec_of
    from reconciler.events import iso_time
    from reconciler.store import meta_float, pid_alive, read_snapshot

    snap = read_snapshot(state_dir)
    if snap is None:
        return None
    now = datetime.now(UTC)
    apps: list[AppStatus] = []
    for record in snap.apps.values():
        spec = spec_of(record)
        alive = pid_alive(record.pid, record.create_time)
        health = record.health
        message = record.message
        if spec.run is not None and record.phase == "running" and not alive:
            health, message = "unhealthy", message or "process not running"
        pid = record.pid if alive else None
        started_at = uptime = rss = None
        if pid is not None and record.create_time is not None:
            started_at = iso_time(datetime.fromtimestamp(record.create_time, UTC))
            uptime = round(now.timestamp() - record.create_time, 1)
            with contextlib.suppress(psutil.Error):
                rss = psutil.Process(pid).memory_info().rss
        apps.append(AppStatus(
            name=record.name, version=record.version, phase=record.phase, health=health,
            message=message, layer=spec.layer, labels=dict(spec.labels),
            depends_on=list(spec.depends_on), suspended=record.suspended,
            failed_version=record.failed_version, restarts=record.restarts, pid=pid,
            started_at=started_at, uptime_s=uptime, rss_bytes=rss,
        ))
    meta = snap.meta
    spec_errors = [e for e in (meta.get("spec_errors") or "").split("\n") if e]
    applied, desired = meta.get("applied_revision"), meta.get("desired_revision")
    state, message = summarize(
        apps, reconciling=False, suspended=meta.get("node_suspended") == "1",
        source_error=meta.get("source_error"), spec_errors=bool(spec_errors),
        at_desired_revision=applied is not None and applied == desired,
    )
    return NodeStatus(
        node=meta.get("node_id", "?"), labels=json.loads(meta.get("labels") or "{}"),
        revision=applied, status=state, message=message, apps=apps,
        updated_at=iso_time(now), desired_revision=desired,
        source_error=meta.get("source_error"), spec_errors=spec_errors,
        agent_version=meta.get("agent_version", ""),
        last_reconcile_at=meta.get("last_reconcile"),
        last_reconcile_ms=meta_float(meta.get("last_reconcile_ms")),
        outbox_backlog=snap.outbox_backlog,
        outbox_dropped=int(meta.get("outbox_dropped") or 0),
    )


def run_status(args: argparse.Namespace) -> int:
    from reconciler.cli import DEFAULT_STATE_DIR
    from reconciler.store import StoreError

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


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def format_status(status: NodeStatus) -> str:
    """A human table: node line, then one row per app."""
    labels = ",".join(f"{k}={v}" for k, v in sorted(status.labels.items())) or "-"
    lines = [
        f"node {status.node}  [{labels}]  {status.status.upper()}  "
        f"revision {(status.revision or '-')[:12]}",
        f"  {status.message}",
    ]
    last = status.last_reconcile_at or "-"
    if status.last_reconcile_ms is not None:
        last += f" ({status.last_reconcile_ms:.0f} ms)"
    lines.append(f"  agent {status.agent_version or '-'}  last reconcile {last}")
    if status.source_error:
        lines.append(f"  source error: {status.source_error}")
    lines += [f"  spec error: {e}" for e in status.spec_errors]
    rows = [("APP", "VERSION", "PHASE", "HEALTH", "PID", "UPTIME", "CPU", "RESTARTS",
             "MESSAGE")]
    for app in sorted(status.apps, key=lambda a: a.name):
        # CPU is sampled by a running agent: "-" for local status without one
        cpu = "-" if app.cpu_percent is None else f"{app.cpu_percent:.1f}%"
        rows.append((
            app.name + (" (suspended)" if app.suspended else ""), app.version, app.phase,
            app.health, str(app.pid or "-"), _age(app.uptime_s), cpu, str(app.restarts),
            app.message[:80],
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                     + "  " + row[-1])
    if len(rows) == 1:
        lines.append("  (no apps)")
    return "\n".join(line.rstrip() for line in lines)
