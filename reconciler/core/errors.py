"""Error hierarchy, by what the agent should do about each kind.

    ReconcileError
    ├── StalledError        a person must fix it: retrying the same input cannot succeed
    │   ├── SignatureError  a revision is unsigned or signed by a key that is not trusted
    │   │   └── RevisionRefused  a signed source moving back (replay) or too far to verify
    │   └── ArtifactError   an artifact failed verification (sha256, unsafe archive entry)
    └── TransientError      git, NATS, runtime hiccups: retry with backoff
        ├── SourceError     fetching the spec repo or an artifact failed
        ├── RuntimeFailure  starting or stopping a process failed
        └── MeshError       NATS unreachable or refusing (reconciler.mesh.conn)

Spec problems are values, not exceptions: the loader collects located SpecProblems and the
planner holds the apps they touch. A dependency that is not healthy yet is not an error
either: the executor reports the waiting app blocked (outcome skipped), the next run retries.
Boundary modules translate third-party exceptions: `raise SourceError(...) from exc`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class SpecProblem:
    """One located problem in a spec file; str() gives `path:line:col: field: message`."""

    path: str
    line: int
    col: int
    message: str
    field: str = ""

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}:{self.col}"
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"


class ReconcileError(Exception):
    """Base of every error the reconciler raises on purpose."""


class StalledError(ReconcileError):
    """Needs a person: retrying the same input cannot succeed."""


class TransientError(ReconcileError):
    """Expected to pass on its own: retry with backoff."""


class SourceError(TransientError):
    """The spec repository or an artifact could not be fetched."""


class SignatureError(StalledError):
    """A revision is unsigned or signed by a key that is not trusted."""


class RevisionRefused(SignatureError):
    """A move the signed-source policy refuses: back to an ancestor of the applied revision
    (a replay of an older signed commit), or past more new commits than it verifies."""


class ArtifactError(StalledError):
    """An artifact failed verification (sha256 mismatch, unsafe archive entry)."""


class RuntimeFailure(TransientError):
    """Starting, stopping or signalling an app's process failed."""
