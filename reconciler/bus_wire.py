"""Wire decisions of the mesh, pure: request bodies, selectors, repo matching, wait verdicts.

Nothing here touches NATS or reads a clock; the bus and the CLI pass `now` in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from reconciler.events import parse_time
from reconciler.spec import NAME_RE, Selector
from reconciler.status import UNREACHABLE, NodeStatus

# How many missed heartbeats make a node unreachable for observers.
UNREACHABLE_AFTER_HEARTBEATS = 3.0


class BadRequest(ValueError):
    """A request body that cannot be served; the message is shown to the caller (code 400)."""


def parse_body(data: bytes, allowed: Iterable[str] = ()) -> dict[str, Any]:
    """An optional JSON object body: b"" -> {}; anything else must be an object of `allowed`."""
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"invalid JSON body: {exc}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        expected = ", ".join(sorted(allowed)) or "no fields"
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; expected {expected}")
    return body


def parse_app_body(data: bytes, known_apps: Iterable[str]) -> str | None:
    """The optional {"app": name} of health/suspend/resume; the app must exist on this node."""
    body = parse_body(data, allowed=("app",))
    app = body.get("app")
    if app is None:
        return None
    if not isinstance(app, str):
        raise BadRequest(f"'app' must be a string, got {type(app).__name__}")
    if not NAME_RE.match(app):
        raise BadRequest(f"'app' {app!r} is not a valid app name")
    known = sorted(known_apps)
    if app not in known:
        raise BadRequest(f"unknown app {app!r}; this node has: {', '.join(known) or 'no apps'}")
    return app


# The keys of a structured selector; a selector object with none of them is a label map.
SELECTOR_KEYS = frozenset({"match", "in", "notin", "exists", "absent"})


def parse_fleet_request(data: bytes) -> Selector | None:
    """Body of gitops.fleet.reconcile: none/{}/{"selector": null} -> every node, or
    {"selector": ...} as parse_selector reads it. Anything else is a BadRequest: the node
    then stays silent rather than answer as if it matched."""
    body = parse_body(data, allowed=("selector",))
    raw = body.get("selector")
    return None if raw is None else parse_selector(raw)


def parse_selector(raw: object) -> Selector:
    """A selector as JSON: Selector-shaped ({"match": {"role": "edge"}, "in": ...}) or, when
    it has none of the keys match/in/notin/exists/absent, a plain label map
    ({"role": "edge"}, the same as {"match": {"role": "edge"}}). BadRequest otherwise."""
    if not isinstance(raw, dict):
        raise BadRequest("'selector' must be an object like {\"role\": \"edge\"} or "
                         "{\"match\": {\"role\": \"edge\"}}")
    if not SELECTOR_KEYS & set(raw):
        for key, value in raw.items():
            if not isinstance(value, str):
                raise BadRequest(f"invalid selector: label {key!r} must be a string, "
                                 f"got {type(value).__name__}")
        return Selector(match=dict(raw))
    try:
        return Selector.model_validate(raw)
    except ValidationError as exc:
        raise BadRequest(f"invalid selector: {_first_error(exc)}") from None


def selector_from_pairs(pairs: Iterable[str]) -> Selector | None:
    """`--selector k=v` flags -> a match Selector (None when no flags were given)."""
    match: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadRequest(f"--selector {pair!r}: expected key=value")
        match[key.strip()] = value.strip()
    return Selector(match=match) if match else None


@dataclass(frozen=True)
class SourceChanged:
    repo: str
    branch: str
    revision: str

    def to_json_bytes(self) -> bytes:
        return json.dumps(
            {"repo": self.repo, "branch": self.branch, "revision": self.revision}
        ).encode()


def parse_source_changed(data: bytes) -> SourceChanged:
    body = parse_body(data, allowed=("repo", "branch", "revision"))
    values = {}
    for key in ("repo", "branch", "revision"):
        value = body.get(key)
        if not isinstance(value, str) or not value:
            raise BadRequest(f"'{key}' must be a non-empty string")
        values[key] = value
    return SourceChanged(**values)


def short_branch(ref: str) -> str:
    return ref.removeprefix("refs/heads/")


_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?([^:/]+):(?!//)(.+)$")


def normalize_repo_url(url: str) -> str:
    """One spelling per repository: scheme, user, port-less host case, '.git' and '/' ignored.

    https://GitHub.com/org/repo.git, git@github.com:org/repo and ssh://git@github.com/org/repo
    all give 'github.com/org/repo'; local paths and file:// URLs give the absolute path.
    """
    text = url.strip()
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme == "file":
            path = parts.path
        else:
            host = (parts.hostname or "").lower()
            path = f"{host}/{parts.path.lstrip('/')}" if host else parts.path
    else:
        scp = _SCP_LIKE.match(text)
        if scp and not text.startswith(("/", ".")):
            path = f"{scp.group(1).lower()}/{scp.group(2).lstrip('/')}"
        else:
            path = text
    path = re.sub(r"/+", "/", path).rstrip("/")
    path = path.removesuffix(".git").rstrip("/")
    return path


def source_matches(change: SourceChanged, repo_url: str, branch: str) -> bool:
    """Does a push announcement concern a node tracking `repo_url` at `branch`?"""
    return short_branch(change.branch) == short_branch(branch) and normalize_repo_url(
        change.repo
    ) == normalize_repo_url(repo_url)


def heartbeat_age(status: NodeStatus, now: datetime, written_at: datetime | None = None) -> float:
    """Seconds since the node last wrote its status (server write time preferred)."""
    when = written_at or parse_time(status.updated_at)
    if when is None:
        return float("inf")
    return max(0.0, (now - when).total_seconds())


def is_unreachable(status: NodeStatus, now: datetime, written_at: datetime | None = None) -> bool:
    limit = UNREACHABLE_AFTER_HEARTBEATS * max(status.heartbeat_interval_s, 0.001)
    return heartbeat_age(status, now, written_at) > limit


def observed_state(status: NodeStatus, now: datetime, written_at: datetime | None = None) -> str:
    """The node status an observer shows: the reported one, or `unreachable`."""
    return UNREACHABLE if is_unreachable(status, now, written_at) else status.status


@dataclass(frozen=True)
class Observed:
    """One KV value as seen by an observer: the status and the server's write time."""

    status: NodeStatus
    written_at: datetime | None = None


def fleet_rows(fleet: Mapping[str, Observed], now: datetime) -> list[dict[str, Any]]:
    """Rows of the `status --nats` fleet table, sorted by node id."""
    rows = []
    for node in sorted(fleet):
        obs = fleet[node]
        st = obs.status
        rows.append(
            {
                "node": node,
                "status": observed_state(st, now, obs.written_at),
                "revision": (st.revision or "")[:12],
                "apps": len(st.apps),
                "labels": ",".join(f"{k}={v}" for k, v in sorted(st.labels.items())),
                "age_s": round(heartbeat_age(st, now, obs.written_at), 1),
                "message": st.message,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for row in rows:
        lines.append("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
    return "\n".join(lines)


def revision_matches(revision: str | None, wanted: str) -> bool:
    """Full SHA equality, or a prefix match for short SHAs (at least 4 hex digits)."""
    if not revision:
        return False
    wanted = wanted.strip().lower()
    return revision.lower() == wanted or (len(wanted) >= 4 and revision.lower().startswith(wanted))


@dataclass(frozen=True)
class WaitVerdict:
    """Where a `wait` stands: synced nodes, failed nodes (with why), and the rest."""

    done: bool
    synced: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.done and not self.failed and not self.pending


def wait_targets(
    fleet: Mapping[str, Observed], nodes: Iterable[str], selector: Selector | None
) -> list[str]:
    """Explicit --node ids (present or not), else every KV node matching the selector."""
    explicit = sorted(set(nodes))
    if explicit:
        return explicit
    return sorted(
        n for n, obs in fleet.items() if selector is None or selector.matches(obs.status.labels)
    )


def node_verdict(
    obs: Observed | None, revision: str, now: datetime
) -> tuple[str, str]:
    """("synced" | "failed" | "pending", explanation) for one targeted node."""
    if obs is None:
        return "pending", "no status in gitops_nodes (never reported)"
    st = obs.status
    at_rev = revision_matches(st.revision, revision)
    wants_rev = at_rev or revision_matches(st.desired_revision, revision)
    if at_rev and st.status == "synced":
        return "synced", "synced"
    if wants_rev and st.status == "failed":
        apps = [f"{a.name}: {a.message}" for a in st.apps
                if a.message and (a.phase in ("failed", "blocked") or a.failed_version)]
        return "failed", "; ".join([st.message or "failed", *apps])
    if wants_rev and st.spec_errors:
        return "failed", "spec errors: " + "; ".join(st.spec_errors[:3])
    if is_unreachable(st, now, obs.written_at):
        age = heartbeat_age(st, now, obs.written_at)
        return "pending", f"unreachable (no heartbeat for {age:.0f}s)"
    where = (st.revision or "no revision")[:12]
    return "pending", f"{st.status} at {where}" + (f": {st.message}" if st.message else "")


def wait_verdict(
    fleet: Mapping[str, Observed], targets: Iterable[str], revision: str, now: datetime
) -> WaitVerdict:
    """Done when every target is synced or failed at `revision`; pending ones keep a wait going."""
    synced: list[str] = []
    failed: dict[str, str] = {}
    pending: dict[str, str] = {}
    for node in targets:
        kind, why = node_verdict(fleet.get(node), revision, now)
        if kind == "synced":
            synced.append(node)
        elif kind == "failed":
            failed[node] = why
        else:
            pending[node] = why
    return WaitVerdict(
        done=not pending, synced=tuple(synced), failed=failed, pending=pending
    )


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return f"{loc}: {err.get('msg', '')}" if loc else str(err.get("msg", ""))
