"""NATS names shared by the agent's mesh and the console: subjects, stream, bucket. Pure."""

from __future__ import annotations

EVENTS_STREAM = "GITOPS_EVENTS"
EVENTS_PREFIX = "gitops.events"
EVENTS_SUBJECTS = "gitops.events.>"
KV_BUCKET = "gitops_nodes"
# Stream and bucket settings: reconciler.mesh.provision builds the configs from these.
EVENTS_MAX_AGE_S = 7 * 24 * 3600.0
# Re-sends after an outage are deduplicated (Nats-Msg-Id) only within this window.
EVENTS_DEDUP_WINDOW_S = 20 * 60.0
KV_HISTORY = 5
# The KV bucket's underlying stream and subject prefix (JetStream naming rules).
KV_STREAM = f"KV_{KV_BUCKET}"
KV_SUBJECT_PREFIX = f"$KV.{KV_BUCKET}"

# Fleet rollouts: one entry per governed revision (key = full SHA), changed by CAS only.
ROLLOUTS_BUCKET = "gitops_rollouts"
ROLLOUTS_HISTORY = 10
ROLLOUTS_STREAM = f"KV_{ROLLOUTS_BUCKET}"
ROLLOUTS_SUBJECT_PREFIX = f"$KV.{ROLLOUTS_BUCKET}"
# A node's report key `<sha>.<node>` expires this long after its last write (a Nats-TTL
# header): folded into the entry within seconds, it is kept a week for late folds and
# for reading; the entries themselves stay (an aborted revision must never apply again).
ROLLOUT_REPORT_TTL = "168h"

RPC_SERVICE = "gitops-node"
RPC_PREFIX = "gitops.rpc"
RPC_ENDPOINTS: tuple[str, ...] = (
    "status", "state", "plan", "reconcile", "health", "suspend", "resume", "logs",
)

FLEET_RECONCILE = "gitops.fleet.reconcile"
SOURCE_CHANGED = "gitops.source.changed"

# micro-service discovery ($SRV.PING, $SRV.INFO.gitops-node, ...)
SRV_PREFIX = "$SRV"


def rpc_subject(node: str, endpoint: str) -> str:
    """`gitops.rpc.<node>.<endpoint>`, e.g. rpc_subject("n1", "status")."""
    return f"{RPC_PREFIX}.{node}.{endpoint}"


def event_subject(node: str, type: str) -> str:
    """`gitops.events.<node>.<type>`; event types contain dots (reconcile.started)."""
    return f"{EVENTS_PREFIX}.{node}.{type}"


def node_events_subject(node: str) -> str:
    """Every event of one node: `gitops.events.<node>.>`."""
    return f"{EVENTS_PREFIX}.{node}.>"


def kv_key_subject(node: str) -> str:
    """The raw subject a KV put for `node` publishes to."""
    return f"{KV_SUBJECT_PREFIX}.{node}"


def node_from_event_subject(subject: str) -> str | None:
    """The node token of an event subject, or None if the subject is not an event."""
    parts = subject.split(".")
    if len(parts) < 4 or ".".join(parts[:2]) != EVENTS_PREFIX:
        return None
    return parts[2]
