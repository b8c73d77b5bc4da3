"""The console's settings (ConsoleConfig) and the checks that refuse unsafe combinations."""

from __future__ import annotations

from dataclasses import dataclass

from console.history import GitHistory
from console.tokens import Token

SINGLE_TOKEN_NAME = "token"  # the audit name of the single --token


@dataclass
class ConsoleConfig:
    token: str | None = None
    read_only: bool = False
    insecure: bool = False
    events_keep: int = 5000
    host: str = "127.0.0.1"
    push_interval: float = 0.25   # coalescing: at most one push per stream per interval
    tick: float = 2.0             # re-check clock-derived state (unreachable) this often
    rpc_timeout: float = 5.0
    max_streams: int = 500        # concurrent live streams (browser tabs) served at once
    fleet_window: float = 1.0     # how long fleet reconcile collects replies
    replay_s: float = 3600.0
    stream_check: float = 2.0     # how often to check stream, bucket, consumer (failover)
    # Link template for event trace ids, e.g. http://jaeger:16686/trace/{trace_id}
    # (--trace-url / GITOPS_MESH_TRACE_URL); None: trace ids are shown, not linked.
    trace_url: str | None = None
    # named tokens with roles (--tokens FILE); `token` above is an operator named "token"
    tokens: tuple[Token, ...] = ()
    # revision history: a read-only bare cache clone of the spec repo (--repo, --branch)
    repo: str | None = None
    branch: str | None = None
    history_interval: float = 60.0   # refresh this often (and on gitops.source.changed)
    git_timeout: float = 30.0
    fleet_health_max: int = 5000     # nodes one fleet health check may ask
    rpc_concurrency: int = 64        # RPCs in flight for one fleet health check
    log_lines_max: int = 1000

    def all_tokens(self) -> tuple[Token, ...]:
        single = (Token(SINGLE_TOKEN_NAME, self.token, "operator"),) if self.token else ()
        return (*single, *self.tokens)

    def check(self) -> None:
        """Refuse unsafe combinations before anything starts."""
        operators = [t for t in self.all_tokens() if t.role == "operator"]
        if not self.read_only and not self.insecure and not operators:
            raise ValueError(
                "actions are enabled but no token is set: pass --token or GITOPS_MESH_TOKEN "
                "(or an operator in --tokens FILE), or --read-only (no actions) or "
                "--insecure (actions without a token)"
            )
        if self.events_keep < 1:
            raise ValueError("--events-keep must be at least 1")
        if self.trace_url is not None:
            check_trace_url(self.trace_url)
        if self.repo:
            GitHistory(self.repo, self.branch)  # refuses a bad --repo or --branch

    @property
    def actions(self) -> bool:
        return not self.read_only


def check_trace_url(template: str) -> None:
    """A --trace-url template must be an http(s) URL with one `{trace_id}` placeholder
    (anything else, e.g. `javascript:`, would put a script link into every event row)."""
    if not template.startswith(("http://", "https://")):
        raise ValueError(f"--trace-url {template!r}: expected an http:// or https:// URL")
    if template.count("{trace_id}") != 1:
        raise ValueError(f"--trace-url {template!r}: expected one {{trace_id}} placeholder, "
                         "e.g. http://jaeger:16686/trace/{trace_id}")
