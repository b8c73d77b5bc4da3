"""The agent's read side: the node's status (RPC, KV, `--once`) and its state (RPC `state`).

Gathers facts from the store, the runtime and the supervision callbacks and hands them to the
one pure builder, core.status.node_status (also behind `status --state-dir`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from reconciler import __version__
from reconciler.core.redact import redact_spec
from reconciler.core.state import DesiredState
from reconciler.core.status import (
    AppFacts,
    AppStatus,
    NodeMeta,
    NodeStatus,
    RunFacts,
    app_status,
    node_status,
)
from reconciler.node.runtimes.base import Runtime
from reconciler.node.store import AppRecord, Store
from reconciler.node.supervision import Supervision


def record_facts(record: AppRecord, spec: Any, **process: Any) -> AppFacts:
    """AppFacts of a stored record plus process facts (alive, pid, started_at, ...)."""
    return AppFacts(
        name=record.name, version=record.version, phase=record.phase, health=record.health,
        message=record.message, spec=spec, suspended=record.suspended,
        failed_version=record.failed_version, restarts=record.restarts, **process,
    )


class StatusView:
    def __init__(
        self, *, store: Store, runtime: Runtime, supervision: Supervision,
        labels: Callable[[], dict[str, str]], node_facts: Callable[[], NodeMeta],
        run_facts: Callable[[], RunFacts], desired: Callable[[], DesiredState | None],
        now: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.supervision = supervision
        self._labels = labels
        self._node_facts = node_facts
        self._run_facts = run_facts
        self._desired = desired
        self._now = now
        # (status, message) the rollout gate shows while it holds a revision, or None
        self.rollout_note: Callable[[], tuple[str, str] | None] = lambda: None

    def app_facts(self, record: AppRecord) -> AppFacts:
        stats = self.runtime.stats(record.name)
        spec = self.store.spec_of(record)
        alive = self.supervision.alive(record.name, stats.state if stats else None)
        if spec.run is None:
            alive = True  # nothing to run: nothing to be down
        return record_facts(
            record, spec, alive=alive, pid=stats.pid if stats else None,
            started_at=stats.started_at if stats else None,
            uptime_s=stats.uptime_s if stats else None,
            cpu_percent=stats.cpu_percent if stats else None,
            rss_bytes=stats.rss_bytes if stats else None,
        )

    def status_of(self, record: AppRecord) -> AppStatus:
        return app_status(self.app_facts(record))

    def status(self) -> NodeStatus:
        backlog, _ = self.store.outbox_stats()
        run = self._run_facts()
        status = node_status(
            self._node_facts(), [self.app_facts(r) for r in self.store.apps().values()],
            now=self._now(), outbox_backlog=backlog, agent_version=__version__, run=run,
        )
        note = self.rollout_note()
        if note is not None and not run.reconciling and status.status in ("synced",
                                                                           "progressing"):
            # waiting for a wave, not enforceable, aborted (and reverted)
            status = status.model_copy(update={"status": note[0], "message": note[1]})
        return status

    def summary_line(self) -> str:
        status = self.status()
        return f"{status.status}: {status.message}"

    def phase_counts(self) -> Mapping[str, int]:
        counts: dict[str, int] = {}
        for record in self.store.apps().values():
            counts[record.phase] = counts.get(record.phase, 0) + 1
        return counts

    def state(self, node_id: str) -> dict[str, Any]:
        desired = self._desired()
        current: dict[str, Any] = {}
        for name, record in self.store.apps().items():
            current[name] = {
                "version": record.version, "spec_hash": record.spec_hash,
                "phase": record.phase, "health": record.health, "message": record.message,
                "running": self.supervision.is_running(record), "suspended": record.suspended,
                "install_dir": record.install_dir, "previous_version": record.prev_version,
                "failed_version": record.failed_version,
                "applied_revision": record.applied_revision, "restarts": record.restarts,
                "spec": redact_spec(self.store.spec_of(record)),
            }
        return {
            "node": node_id,
            "desired": {
                "revision": desired.revision if desired else None,
                "apps": {n: redact_spec(s) for n, s in desired.apps.items()} if desired else {},
                "invalid": sorted(desired.invalid) if desired else [],
                "problems": [str(p) for p in desired.problems] if desired else [],
            },
            "current": current,
        }
