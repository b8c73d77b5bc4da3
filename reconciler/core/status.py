"""Node status: the JSON in `status --json`, RPC `status` and KV `gitops_nodes`. Pure."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from reconciler.core.events import iso_time, parse_time
from reconciler.core.spec import AppSpec
from reconciler.core.states import BUSY_PHASES, STUCK_PHASES, NodeState

# Observers derive this one from heartbeat age; a node never reports it itself.
UNREACHABLE = "unreachable"
# A node is unreachable once this many heartbeat intervals passed without a status write.
UNREACHABLE_AFTER_HEARTBEATS = 3.0


class AppStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    phase: str
    health: str = "unknown"
    message: str = ""
    layer: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    suspended: bool = False
    # Set when an upgrade/reconfigure to this version failed and was rolled back: the app
    # serves its previous `version`, and the node reports `failed` for this rollout.
    failed_version: str | None = None
    restarts: int = 0
    pid: int | None = None
    started_at: str | None = None
    uptime_s: float | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None


class NodeStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: str
    labels: dict[str, str] = Field(default_factory=dict)
    revision: str | None = None
    status: str = "progressing"
    message: str = ""
    apps: list[AppStatus] = Field(default_factory=list)
    updated_at: str
    agent_version: str = ""
    desired_revision: str | None = None
    source_error: str | None = None
    spec_errors: list[str] = Field(default_factory=list)
    last_reconcile_at: str | None = None
    last_reconcile_ms: float | None = None
    run_id: str | None = None
    heartbeat_interval_s: float = 10.0
    outbox_backlog: int = 0
    outbox_dropped: int = 0
    trace_id: str | None = None
    # apps left out of `apps` so the status fits one NATS message (see fit_status)
    apps_omitted: int = 0
    # what the node's mesh found wrong with the stream or buckets it uses (nats-init fixes)
    mesh_problems: list[str] = Field(default_factory=list)

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any]) -> NodeStatus:
        if isinstance(data, dict):
            return cls.model_validate(data)
        return cls.model_validate_json(data)


def summarize(
    apps: Iterable[AppStatus],
    *,
    reconciling: bool,
    suspended: bool,
    source_error: str | None,
    spec_errors: bool,
    at_desired_revision: bool,
    store_error: str | None = None,
) -> tuple[NodeState, str]:
    """(node status, one-line reason) from the apps' phases and the agent's situation. A
    state store that cannot be written (a full disk) is degraded whatever else holds: the
    agent changes nothing until it can record what it does."""
    apps = list(apps)
    if suspended:
        return "suspended", "reconciliation suspended by an operator"
    failed = sorted(a.name for a in apps if a.phase in STUCK_PHASES)
    if failed:
        return "failed", "failed or blocked: " + ", ".join(failed)
    rolled_back = sorted(f"{a.name} {a.failed_version}" for a in apps if a.failed_version)
    if rolled_back and not reconciling:
        return "failed", "rolled back after a failed upgrade: " + ", ".join(rolled_back)
    if store_error:
        return "degraded", f"{store_error} (apps kept as they run; retrying)"
    if reconciling or any(a.phase in BUSY_PHASES for a in apps):
        return "progressing", "reconciling"
    if not at_desired_revision:
        return "progressing", "desired revision not applied yet"
    unhealthy = sorted(
        a.name for a in apps if a.health == "unhealthy" and not a.suspended
    )
    if unhealthy:
        return "degraded", "unhealthy: " + ", ".join(unhealthy)
    if source_error:
        return "degraded", f"source: {source_error}"
    if spec_errors:
        return "degraded", "spec errors at the latest revision (running apps kept)"
    return "synced", "all apps running and healthy"


# ---- observers' view: heartbeat age ------------------------------------------------------

def heartbeat_age(status: NodeStatus, now: datetime, written_at: datetime | None = None) -> float:
    """Seconds since the node last wrote its status (server write time preferred)."""
    when = written_at or parse_time(status.updated_at)
    if when is None:
        return float("inf")
    return max(0.0, (now - when).total_seconds())


def is_unreachable(status: NodeStatus, now: datetime, written_at: datetime | None = None) -> bool:
    return heartbeat_stale(status.updated_at, status.heartbeat_interval_s, now, written_at)


def heartbeat_stale(updated_at: str | None, heartbeat_interval_s: float, now: datetime,
                    written_at: datetime | None = None) -> bool:
    """The unreachable rule on bare values: more than UNREACHABLE_AFTER_HEARTBEATS missed
    heartbeats since the last write (for readers that do not build a NodeStatus, such as
    the rollouts' fleet read)."""
    when = written_at or parse_time(updated_at)
    age = float("inf") if when is None else max(0.0, (now - when).total_seconds())
    return age > UNREACHABLE_AFTER_HEARTBEATS * max(heartbeat_interval_s, 0.001)


def observed_state(status: NodeStatus, now: datetime, written_at: datetime | None = None) -> str:
    """The node status an observer shows: the reported one, or `unreachable`."""
    return UNREACHABLE if is_unreachable(status, now, written_at) else status.status


# ---- the one status builder ---------------------------------------------------------------

@dataclass(frozen=True)
class NodeMeta:
    """The node-wide facts an agent keeps in its store (the `meta` table), typed.

    `to_rows`/`from_rows` are the only places that know the stored keys and encodings."""

    node_id: str = "?"
    labels: dict[str, str] = field(default_factory=dict)
    agent_version: str = ""
    applied_revision: str | None = None
    desired_revision: str | None = None
    source_error: str | None = None
    spec_errors: tuple[str, ...] = ()
    suspended: bool = False
    last_reconcile_at: str | None = None
    last_reconcile_ms: float | None = None
    outbox_dropped: int = 0
    # the aborted rollout this node reverted from (it stays reverted: see node.rollout_gate)
    rollout_reverted: str | None = None

    # field -> stored key, where they differ
    _KEYS = {"suspended": "node_suspended", "last_reconcile_at": "last_reconcile"}

    @classmethod
    def key(cls, name: str) -> str:
        return cls._KEYS.get(name, name)

    @classmethod
    def from_rows(cls, rows: Mapping[str, str]) -> NodeMeta:
        def get(name: str) -> str | None:
            return rows.get(cls.key(name))

        return cls(
            node_id=get("node_id") or "?",
            labels=_json_labels(get("labels")),
            agent_version=get("agent_version") or "",
            applied_revision=get("applied_revision"),
            desired_revision=get("desired_revision"),
            source_error=get("source_error"),
            spec_errors=tuple(e for e in (get("spec_errors") or "").split("\n") if e),
            suspended=get("suspended") == "1",
            last_reconcile_at=get("last_reconcile_at"),
            last_reconcile_ms=_number(get("last_reconcile_ms")),
            outbox_dropped=int(_number(get("outbox_dropped")) or 0),
            rollout_reverted=get("rollout_reverted"),
        )

    def to_rows(self, names: Iterable[str] | None = None) -> dict[str, str | None]:
        """Stored key -> text (None: delete the row) for the fields `names` (default all)."""
        wanted = set(names) if names is not None else {f.name for f in fields(self)}
        rows: dict[str, str | None] = {}
        for name in wanted:
            value = getattr(self, name)
            if name == "labels":
                text: str | None = json.dumps(value, sort_keys=True)
            elif name == "spec_errors":
                text = "\n".join(value) or None
            elif name == "suspended":
                text = "1" if value else None
            elif value is None:
                text = None
            else:
                text = str(value)
            rows[self.key(name)] = text
        return rows

    def changed(self, **changes: Any) -> NodeMeta:
        return replace(self, **changes)


def _json_labels(text: str | None) -> dict[str, str]:
    try:
        loaded = json.loads(text or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}


def _number(text: str | None) -> float | None:
    """A number kept as text; None when absent or unreadable."""
    try:
        return float(text) if text else None
    except ValueError:
        return None


@dataclass(frozen=True)
class AppFacts:
    """What a node knows of one app: its stored record and what its process looks like.

    `alive`: the process runs (or, for the agent, restarts in backoff or finished as its
    restart policy allows); `started_at` is epoch seconds."""

    name: str
    version: str
    phase: str
    health: str
    message: str
    spec: AppSpec
    suspended: bool = False
    failed_version: str | None = None
    restarts: int = 0
    alive: bool = False
    pid: int | None = None
    started_at: float | None = None
    uptime_s: float | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None


def app_status(facts: AppFacts) -> AppStatus:
    """One app's status. An app that should run a process and runs none is unhealthy
    whatever its last probe said; one without a probe is healthy while its process lives."""
    health, message = facts.health, facts.message
    if facts.spec.run is not None and facts.phase == "running":
        if not facts.alive:
            health, message = "unhealthy", message or "process not running"
        elif facts.spec.health.probe_kind is None:
            health = "healthy"
    started_at = None
    if facts.started_at is not None:
        started_at = iso_time(datetime.fromtimestamp(facts.started_at, UTC))
    return AppStatus(
        name=facts.name, version=facts.version, phase=facts.phase, health=health,
        message=message, layer=facts.spec.layer, labels=dict(facts.spec.labels),
        depends_on=list(facts.spec.depends_on), suspended=facts.suspended,
        failed_version=facts.failed_version, restarts=facts.restarts, pid=facts.pid,
        started_at=started_at,
        uptime_s=round(facts.uptime_s, 1) if facts.uptime_s else None,
        cpu_percent=facts.cpu_percent, rss_bytes=facts.rss_bytes,
    )


@dataclass(frozen=True)
class RunFacts:
    """What a node's agent knows beyond its store: the reconcile running now, the last one,
    the heartbeat it keeps (none of it for `status --state-dir` without an agent)."""

    reconciling: bool = False
    run_id: str | None = None
    trace_id: str | None = None
    heartbeat_interval_s: float = 10.0
    store_error: str | None = None  # the last state store write failed (a full disk)


def node_status(
    meta: NodeMeta, apps: Iterable[AppFacts], *, now: datetime, outbox_backlog: int,
    agent_version: str | None = None, run: RunFacts | None = None,
) -> NodeStatus:
    """The NodeStatus of a node: the one builder behind the agent's status (RPC, KV) and
    `status --state-dir`. Pure: the clock and every fact come in as values."""
    run = run or RunFacts()
    statuses = [app_status(facts) for facts in apps]
    state, message = summarize(
        statuses, reconciling=run.reconciling, suspended=meta.suspended,
        source_error=meta.source_error, spec_errors=bool(meta.spec_errors),
        at_desired_revision=meta.applied_revision is not None
        and meta.applied_revision == meta.desired_revision,
        store_error=run.store_error,
    )
    return NodeStatus(
        node=meta.node_id, labels=dict(meta.labels), revision=meta.applied_revision,
        status=state, message=message, apps=statuses, updated_at=iso_time(now),
        agent_version=agent_version if agent_version is not None else meta.agent_version,
        desired_revision=meta.desired_revision, source_error=meta.source_error,
        spec_errors=list(meta.spec_errors), last_reconcile_at=meta.last_reconcile_at,
        last_reconcile_ms=meta.last_reconcile_ms, run_id=run.run_id,
        heartbeat_interval_s=run.heartbeat_interval_s, outbox_backlog=outbox_backlog,
        outbox_dropped=meta.outbox_dropped, trace_id=run.trace_id,
    )


# ---- fitting one message ------------------------------------------------------------------

MAX_MESSAGE_CHARS = 500  # of an app's or the node's message
MAX_SPEC_ERRORS = 50


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def capped(status: NodeStatus) -> NodeStatus:
    """Messages and lists a node reports, bounded (a status is written every few seconds)."""
    return status.model_copy(update={
        "message": _cap(status.message, MAX_MESSAGE_CHARS),
        "source_error": _cap(status.source_error, MAX_MESSAGE_CHARS)
        if status.source_error else status.source_error,
        "spec_errors": [_cap(e, MAX_MESSAGE_CHARS) for e in status.spec_errors[:MAX_SPEC_ERRORS]],
        "apps": [a.model_copy(update={"message": _cap(a.message, MAX_MESSAGE_CHARS)})
                 for a in status.apps],
    })


def fit_status(status: NodeStatus, max_bytes: int) -> NodeStatus:
    """The status as it fits `max_bytes` of JSON: first as it is (messages capped), then
    without per-app details (labels, depends_on, long messages), then listing the apps with
    problems first and as many others as fit, counting the rest in `apps_omitted`. A status
    write must never fail on size: an unwritten status reads as an unreachable node."""
    status = capped(status)
    if len(status.to_json_bytes()) <= max_bytes:
        return status
    slim = status.model_copy(update={
        "spec_errors": [_cap(e, 120) for e in status.spec_errors[:10]],
        "apps": [a.model_copy(update={"labels": {}, "depends_on": [],
                                      "message": _cap(a.message, 120)})
                 for a in status.apps],
    })
    if len(slim.to_json_bytes()) <= max_bytes:
        return slim
    ordered = sorted(slim.apps, key=lambda a: (not _needs_attention(a), a.name))
    low, high = 0, len(ordered)
    while low < high:  # the most apps that fit
        mid = (low + high + 1) // 2
        if len(_listing(slim, ordered, mid).to_json_bytes()) <= max_bytes:
            low = mid
        else:
            high = mid - 1
    return _listing(slim, ordered, low)


def _needs_attention(app: AppStatus) -> bool:
    return app.phase != "running" or app.health == "unhealthy" or bool(app.failed_version)


def _listing(status: NodeStatus, ordered: list[AppStatus], count: int) -> NodeStatus:
    omitted = len(ordered) - count
    return status.model_copy(update={
        "apps": ordered[:count], "apps_omitted": omitted,
        "message": _cap(f"{status.message} ({omitted} apps not listed: status too large)", 300),
    })
