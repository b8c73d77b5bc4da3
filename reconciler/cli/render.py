"""How the CLI shows a node's status to a person: one table for `status`, local or remote."""

from __future__ import annotations

from reconciler.core.status import NodeStatus


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
