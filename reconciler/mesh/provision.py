"""The one builder of the events stream and bucket configs, and their create / verify on a server.

`nats-init` (admin identity) creates what is missing with `replicas` and reports what differs;
agents and the console call `verify` on connect and, in dev mode (nobody ran nats-init), create
what is missing with the same builder and a warning naming `nats-init`.

    desired(replicas)      -> [Wanted(kind, name, StreamConfig)]   (pure)
    differences(want, got) -> ["subjects: ... (documented: ...)"]   (pure)
    inspect / provision / ensure                                   (JetStream requests)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import nats.errors
import nats.js.errors
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from reconciler.mesh.subjects import (
    EVENTS_DEDUP_WINDOW_S,
    EVENTS_MAX_AGE_S,
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
    KV_BUCKET,
    KV_HISTORY,
    ROLLOUTS_BUCKET,
    ROLLOUTS_HISTORY,
)

log = logging.getLogger("reconciler.mesh.provision")

Kind = Literal["stream", "bucket"]
DEV_MODE_HINT = "run `gitops-mesh nats-init` with an admin identity to provision it"
# A KV bucket's own duplicate window (nats-py and the nats CLI use 2 minutes).
KV_DUPLICATE_WINDOW_S = 120.0


class NotProvisioned(Exception):
    """Missing, and this identity may not create it (a refused create gets no answer)."""


@dataclass(frozen=True)
class Wanted:
    """One thing the mesh needs on the server: the events stream or a KV bucket."""

    kind: Kind
    name: str  # stream name, or bucket name for a bucket
    config: StreamConfig

    @property
    def stream(self) -> str:
        return str(self.config.name)

    @property
    def label(self) -> str:
        return f"stream {self.name}" if self.kind == "stream" else f"bucket {self.name}"


def events_stream(replicas: int = 1) -> Wanted:
    return Wanted("stream", EVENTS_STREAM, StreamConfig(
        name=EVENTS_STREAM, description="gitops-mesh events", subjects=[EVENTS_SUBJECTS],
        retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, discard=DiscardPolicy.OLD,
        max_age=EVENTS_MAX_AGE_S, duplicate_window=EVENTS_DEDUP_WINDOW_S,
        max_msgs=-1, max_bytes=-1, max_msgs_per_subject=-1, num_replicas=replicas,
    ))


def bucket(name: str, history: int, description: str, replicas: int = 1,
           msg_ttl: bool = False) -> Wanted:
    """The stream behind a KV bucket, as nats-py's create_key_value and the nats CLI make it;
    `msg_ttl`: values may carry their own expiry (a Nats-TTL header; nats-server 2.11+)."""
    return Wanted("bucket", name, StreamConfig(
        name=f"KV_{name}", description=description, subjects=[f"$KV.{name}.>"],
        retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, discard=DiscardPolicy.NEW,
        max_msgs_per_subject=history, max_msgs=-1, max_bytes=-1, max_age=0.0,
        duplicate_window=KV_DUPLICATE_WINDOW_S, allow_rollup_hdrs=True, deny_delete=True,
        allow_direct=True, num_replicas=replicas, allow_msg_ttl=True if msg_ttl else None,
    ))


def nodes_bucket(replicas: int = 1) -> Wanted:
    return bucket(KV_BUCKET, KV_HISTORY, "gitops-mesh node status", replicas)


def rollouts_bucket(replicas: int = 1) -> Wanted:
    # the nodes' report keys expire (ROLLOUT_REPORT_TTL); the entries stay (a revert sticks)
    return bucket(ROLLOUTS_BUCKET, ROLLOUTS_HISTORY, "gitops-mesh fleet rollouts", replicas,
                  msg_ttl=True)


def desired(replicas: int = 1) -> list[Wanted]:
    """Everything `nats-init` provisions, in order."""
    return [events_stream(replicas), nodes_bucket(replicas), rollouts_bucket(replicas)]


def _value(config: StreamConfig, name: str) -> object:
    value = getattr(config, name)
    if name == "subjects":
        return sorted(value or [])
    if name in ("max_msgs", "max_bytes", "max_msgs_per_subject") and value in (None, 0):
        return -1  # the server's "unlimited"
    if name == "max_age" and value is None:
        return 0.0
    if name == "num_replicas" and value is None:
        return 1
    if name == "allow_msg_ttl":
        return bool(value)
    if hasattr(value, "value"):
        return value.value
    return value


# What must hold for the mesh to work as documented: the subjects (a stream that captures
# gitops.rpc.> acks RPC requests in place of the nodes), retention and the limits.
CHECKED = ("subjects", "retention", "max_msgs", "max_bytes", "max_age",
           "max_msgs_per_subject", "discard", "duplicate_window", "storage")


# What nats-init also sees to (agents and the console do not flag it: without it the mesh
# works, only the rollouts' report keys do not expire; a report is then written without TTL).
PROVISIONED = ("num_replicas", "allow_msg_ttl")


def differences(want: Wanted, got: StreamConfig, *, replicas: bool = False) -> list[str]:
    """Every checked setting of `got` that is not the documented one (pure); `replicas`:
    nats-init's view (PROVISIONED too)."""
    names = (*CHECKED, *PROVISIONED) if replicas else CHECKED
    out = []
    for name in names:
        if name == "duplicate_window" and want.kind == "bucket":
            continue  # a bucket's window only matters to its own writers
        have, wanted = _value(got, name), _value(want.config, name)
        if have != wanted:
            out.append(f"{name} is {_show(have)} (documented: {_show(wanted)})")
    return out


def _show(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, float) and value.is_integer():
        return f"{int(value)}s" if value else "0 (unlimited)"
    return str(value)


@dataclass
class Finding:
    """What the server holds for one Wanted: missing, matching, or differing (with how)."""

    wanted: Wanted
    state: Literal["missing", "created", "matching", "differs", "updated"]
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = self.wanted.label
        if self.state in ("differs", "updated"):
            verb = "differs" if self.state == "differs" else "updated"
            return f"{what} {verb}: " + "; ".join(self.problems)
        return f"{what} {self.state}"


async def stream_config(js: JetStreamContext, stream: str) -> StreamConfig | None:
    """The server's config of `stream`, None if it does not exist."""
    try:
        return (await js.stream_info(stream)).config
    except nats.js.errors.NotFoundError:
        return None


async def inspect(js: JetStreamContext, wanted: Wanted, *, replicas: bool = False) -> Finding:
    config = await stream_config(js, wanted.stream)
    if config is None:
        return Finding(wanted, "missing")
    problems = differences(wanted, config, replicas=replicas)
    return Finding(wanted, "differs" if problems else "matching", problems)


async def create(js: JetStreamContext, wanted: Wanted) -> Finding:
    """Create `wanted`; if someone else created it meanwhile, inspect theirs instead."""
    try:
        await js.add_stream(wanted.config)
    except nats.js.errors.BadRequestError:  # "already in use": created meanwhile
        return await inspect(js, wanted)
    return Finding(wanted, "created")


def updatable(problems: list[str]) -> bool:
    """JetStream cannot change retention or storage of an existing stream."""
    return not any(p.startswith(("retention ", "storage ")) for p in problems)


async def provision(js: JetStreamContext, replicas: int, *, update: bool = False
                    ) -> list[Finding]:
    """nats-init: create what is missing; report what differs (incl. replicas). With
    `update`, differences JetStream can change in place are applied; never data deletion."""
    findings = []
    for wanted in desired(replicas):
        finding = await inspect(js, wanted, replicas=True)
        if finding.state == "missing":
            finding = await create(js, wanted)
        elif finding.state == "differs" and update and updatable(finding.problems):
            await js.update_stream(wanted.config)
            finding = Finding(wanted, "updated", finding.problems)
        findings.append(finding)
    return findings


async def ensure(js: JetStreamContext, wanted: Wanted, *, create_missing: bool = True
                 ) -> Finding:
    """What an agent or the console does on connect: check `wanted` (not its replicas: those
    are the operator's choice); in dev mode create it when missing, with a warning.

    Raises nats.js.errors.NotFoundError when it is missing and `create_missing` is off."""
    finding = await inspect(js, wanted)
    if finding.state == "missing":
        if not create_missing:
            raise nats.js.errors.NotFoundError(description=f"{wanted.label} does not exist")
        try:
            finding = await create(js, wanted)
        except (TimeoutError, nats.errors.TimeoutError):
            raise NotProvisioned(f"{wanted.label} is missing and this identity may not "
                                 f"create it: {DEV_MODE_HINT}") from None
        if finding.state == "created":
            log.warning("%s did not exist: created it with 1 replica (dev mode); %s",
                        wanted.label, DEV_MODE_HINT)
    if finding.state == "differs":
        log.error("%s does not have the documented settings: %s; %s", wanted.label,
                  "; ".join(finding.problems), "fix it with `gitops-mesh nats-init`")
    return finding


def mismatch_message(findings: list[Finding]) -> str | None:
    """One line for a status message, a health answer or a banner; None when all is well."""
    bad = [f.describe() for f in findings if f.state == "differs"]
    return ("NATS provisioning mismatch: " + " | ".join(bad)) if bad else None

