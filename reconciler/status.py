"""Node status: the JSON in `status --json`, RPC `status` and KV `gitops_nodes`. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NodeState = Literal["synced", "progressing", "degraded", "failed", "suspended"]
NODE_STATES: tuple[str, ...] = ("synced", "progressing", "degraded", "failed", "suspended")
# Observers derive this one from heartbeat age; a node never reports it itself.
UNREACHABLE = "unreachable"

_BUSY_PHASES = {"pending", "deploying", "upgrading", "rolling-back", "removing"}


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
) -> tuple[str, str]:
    """(node status, one-line reason) from the apps' phases and the agent's situation."""
    apps = list(apps)
    if suspended:
        return "suspended", "reconciliation suspended by an operator"
    failed = sorted(a.name for a in apps if a.phase in ("failed", "blocked"))
    if failed:
        return "failed", "failed or blocked: " + ", ".join(failed)
    rolled_back = sorted(f"{a.name} {a.failed_version}" for a in apps if a.failed_version)
    if rolled_back and not reconciling:
        return "failed", "rolled back after a failed upgrade: " + ", ".join(rolled_back)
    if reconciling or any(a.phase in _BUSY_PHASES for a in apps):
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
