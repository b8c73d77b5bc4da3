"""Least-privilege NATS auth: permissions per identity (pure) and the files `nats-config` writes.

Identities: one per node (publishes only its own events, status key and the JetStream calls
it needs; answers only its own RPC subjects), `console` (reads everything, triggers RPC and
fleet reconciles), `observer` (reads only), `notifier` (the git hook: announces pushes) and
`admin` (`gitops-mesh nats-init`: the only identity that may create, update or delete streams
and buckets; every other identity is denied the JetStream stream-management API outright).
Users land in the server's global account, which has JetStream when the server runs with it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from reconciler.core.envfile import parse_env
from reconciler.core.spec import NAME_RE
from reconciler.mesh.subjects import (
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
    FLEET_RECONCILE,
    KV_STREAM,
    KV_SUBJECT_PREFIX,
    ROLLOUTS_STREAM,
    ROLLOUTS_SUBJECT_PREFIX,
    SOURCE_CHANGED,
    SRV_PREFIX,
    event_subject,
    kv_key_subject,
)

CONSOLE = "console"
OBSERVER = "observer"
NOTIFIER = "notifier"
ADMIN = "admin"
RESERVED = (CONSOLE, OBSERVER, NOTIFIER, ADMIN)
JS = "$JS.API"
# Stream management: admin only. Denied explicitly (deny wins over any allow) so that a
# broad allow added by hand later cannot hand it to a node again.
_MANAGEMENT_OPS = ("CREATE", "UPDATE", "DELETE", "PURGE", "RESTORE", "SNAPSHOT", "MSG.DELETE",
                  "PEER.REMOVE", "LEADER.STEPDOWN")
STREAM_MANAGEMENT = tuple(f"{prefix}.STREAM.{op}.>" for prefix in (JS, "$JS.*.API")
                          for op in _MANAGEMENT_OPS)
AUTH_FILE = "auth.conf"
READ_RPC = ("status", "state", "plan", "health")


class NatsConfigError(ValueError):
    """Bad nats-config input (message names the offending value)."""


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    deny_publish: tuple[str, ...] = STREAM_MANAGEMENT
    # Lets a service answer requests (one reply to each request's reply subject) without a
    # blanket right to publish into other clients' inboxes.
    allow_responses: bool = False

    def to_conf(self) -> dict[str, Any]:
        publish: dict[str, list[str]] = {"allow": list(self.publish)}
        if self.deny_publish:
            publish["deny"] = list(self.deny_publish)
        conf: dict[str, Any] = {
            "publish": publish,
            "subscribe": {"allow": list(self.subscribe)},
        }
        if self.allow_responses:
            conf["allow_responses"] = True
        return conf


def inbox_prefix(identity: str) -> str:
    """Each node gets replies on its own inbox prefix (the Mesh uses _INBOX.<node>)."""
    return f"_INBOX.{identity}"


def node_permissions(node: str) -> Permissions:
    return Permissions(
        publish=(
            event_subject(node, ">"),
            kv_key_subject(node),
            f"{JS}.STREAM.INFO.{EVENTS_STREAM}",
            f"{JS}.STREAM.INFO.{KV_STREAM}",
            # fleet rollouts: compare-and-set any revision's entry (the server checks the
            # expected sequence), watch it, and read the fleet's statuses (wave membership,
            # offline nodes); only the admin (nats-init) creates the bucket
            f"{ROLLOUTS_SUBJECT_PREFIX}.*",
            f"{ROLLOUTS_SUBJECT_PREFIX}.*.{node}",  # its own report key <sha>.<node>
            *_js_watch(ROLLOUTS_STREAM),
            *_js_watch(KV_STREAM)[1:],  # its STREAM.INFO is above
            "$JS.FC.>",
        ),
        subscribe=(
            f"gitops.rpc.{node}.>",
            f"{SRV_PREFIX}.>",
            FLEET_RECONCILE,
            SOURCE_CHANGED,
            f"{inbox_prefix(node)}.>",
        ),
        allow_responses=True,
    )


def _js_watch(stream: str) -> tuple[str, ...]:
    """What a node needs to get a KV key and watch a bucket (ephemeral ordered consumers
    only: no durable consumers, no pulls, no acks)."""
    return (
        f"{JS}.STREAM.INFO.{stream}", f"{JS}.STREAM.MSG.GET.{stream}",
        f"{JS}.DIRECT.GET.{stream}", f"{JS}.DIRECT.GET.{stream}.>",
        f"{JS}.CONSUMER.CREATE.{stream}", f"{JS}.CONSUMER.CREATE.{stream}.>",
        f"{JS}.CONSUMER.DELETE.{stream}.*", f"{JS}.CONSUMER.INFO.{stream}.*",
    )


def _js_read() -> tuple[str, ...]:
    """JetStream calls for reading the event stream, the status KV and the rollouts KV
    (watch, get, history)."""
    subjects: list[str] = [f"{JS}.INFO", f"{JS}.STREAM.NAMES", f"{JS}.STREAM.LIST"]
    subjects += _js_read_streams((EVENTS_STREAM, KV_STREAM, ROLLOUTS_STREAM))
    return (*subjects, "$JS.FC.>", f"{SRV_PREFIX}.>")


def _js_read_streams(streams: tuple[str, ...]) -> list[str]:
    subjects: list[str] = []
    for stream in streams:
        subjects += [
            f"{JS}.STREAM.INFO.{stream}",
            f"{JS}.STREAM.MSG.GET.{stream}",
            f"{JS}.DIRECT.GET.{stream}",
            f"{JS}.DIRECT.GET.{stream}.>",
            f"{JS}.CONSUMER.CREATE.{stream}",
            f"{JS}.CONSUMER.CREATE.{stream}.>",
            f"{JS}.CONSUMER.DURABLE.CREATE.{stream}.*",
            f"{JS}.CONSUMER.DELETE.{stream}.*",
            f"{JS}.CONSUMER.INFO.{stream}.*",
            f"{JS}.CONSUMER.MSG.NEXT.{stream}.*",
            f"{JS}.CONSUMER.NAMES.{stream}",
            f"{JS}.CONSUMER.LIST.{stream}",
            f"$JS.ACK.{stream}.>",
        ]
    return subjects


def observer_permissions() -> Permissions:
    return Permissions(
        publish=(*_js_read(), *(f"gitops.rpc.*.{ep}" for ep in READ_RPC)),
        subscribe=("_INBOX.>", EVENTS_SUBJECTS, f"{KV_SUBJECT_PREFIX}.>",
                   f"{ROLLOUTS_SUBJECT_PREFIX}.>"),
    )


def console_permissions() -> Permissions:
    """The console and operator commands (`reconcile`, `rollout pause|resume|abort|promote`):
    read everything, trigger, change rollout entries by CAS and announce what they did."""
    return Permissions(
        publish=(
            *_js_read(), "gitops.rpc.*.*", FLEET_RECONCILE,
            f"{ROLLOUTS_SUBJECT_PREFIX}.*",  # rollout entries, by compare-and-set
            # its audit events (node id `console` is reserved; rollout.* included) and
            # "Forget node" (a KV delete)
            event_subject(CONSOLE, ">"), f"{KV_SUBJECT_PREFIX}.*",
        ),
        # the history page refreshes on a push hook's notice
        subscribe=("_INBOX.>", EVENTS_SUBJECTS, f"{KV_SUBJECT_PREFIX}.>",
                   f"{ROLLOUTS_SUBJECT_PREFIX}.>", SOURCE_CHANGED),
    )


def admin_permissions() -> Permissions:
    """`nats-init`: the whole JetStream API of the account, nothing of the mesh's traffic."""
    return Permissions(publish=(f"{JS}.>",), subscribe=("_INBOX.>",), deny_publish=())


def notifier_permissions() -> Permissions:
    return Permissions(publish=(SOURCE_CHANGED,), subscribe=())


def permissions_for(identity: str) -> Permissions:
    return {
        CONSOLE: console_permissions,
        OBSERVER: observer_permissions,
        NOTIFIER: notifier_permissions,
        ADMIN: admin_permissions,
    }.get(identity, lambda: node_permissions(identity))()


def render_auth(users: list[tuple[dict[str, str], Permissions]]) -> str:
    """The `authorization { users = [...] }` include; JSON values are valid NATS conf syntax."""
    lines = [
        "# generated by gitops-mesh nats-config. In nats-server.conf (JetStream enabled):",
        "#   include ./auth.conf",
        "# Credentials, one per identity (mode 0600), as GITOPS_MESH_NATS_* env files:",
        "#   <node>.env    each node agent (publishes only its own events and status key)",
        "#   console.env   the web console and `reconcile` (reads all, triggers)",
        "#   observer.env  `status` and `wait` (read-only)",
        "#   notifier.env  the git post-receive hook (`notify` only)",
        "#   admin.env     `gitops-mesh nats-init` (creates the stream and buckets; keep offline)",
        "", "authorization {", "  users = [",
    ]
    for creds, perms in users:
        entry = {**creds, "permissions": perms.to_conf()}
        body = json.dumps(entry, indent=2).replace("\n", "\n    ")
        lines.append(f"    {body}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def check_nodes(nodes: list[str]) -> list[str]:
    if not nodes:
        raise NatsConfigError("give at least one --node")
    for node in nodes:
        if not NAME_RE.match(node):
            raise NatsConfigError(f"--node {node!r}: node ids are [a-z0-9] and '-', 1-63 chars")
        if node in RESERVED:
            raise NatsConfigError(f"--node {node!r}: the name is reserved for an identity")
    return sorted(set(nodes))


def _new_nkey_seed() -> str:
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()


def _nkey_public(seed: str) -> str:
    return bytes(nkeys.from_seed(bytearray(seed.encode())).public_key).decode()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def write_config(out: Path, nodes: list[str], auth: str = "nkey") -> list[Path]:
    """Write auth.conf and one credential file per identity (0600). Existing credentials in
    `out` are kept, so re-running for a new node does not lock out running ones."""
    if auth not in ("nkey", "password"):
        raise NatsConfigError(f"--auth {auth!r}: use nkey or password")
    identities = [*check_nodes(nodes), CONSOLE, OBSERVER, NOTIFIER, ADMIN]
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    written: list[Path] = []
    users: list[tuple[dict[str, str], Permissions]] = []
    for identity in identities:
        env_path = out / f"{identity}.env"
        if auth == "nkey":
            seed_path = out / f"{identity}.nk"
            seed = seed_path.read_text().strip() if seed_path.exists() else _new_nkey_seed()
            if not re.match(r"^SU[A-Z2-7]+$", seed):
                raise NatsConfigError(f"{seed_path}: not a user nkey seed")
            _write_private(seed_path, seed + "\n")
            _write_private(env_path, f"GITOPS_MESH_NATS_NKEY={seed_path.resolve()}\n")
            written += [seed_path, env_path]
            users.append(({"nkey": _nkey_public(seed)}, permissions_for(identity)))
        else:
            old = parse_env(env_path.read_text(), str(env_path)) if env_path.exists() else {}
            password = old.get("GITOPS_MESH_NATS_PASSWORD") or secrets.token_urlsafe(24)
            _write_private(
                env_path,
                f"GITOPS_MESH_NATS_USER={identity}\nGITOPS_MESH_NATS_PASSWORD={password}\n",
            )
            written.append(env_path)
            users.append(({"user": identity, "password": password}, permissions_for(identity)))
    conf = out / AUTH_FILE
    _write_private(conf, render_auth(users))
    return [conf, *written]
