"""Error hierarchy, by what the agent should do about each kind.

    ReconcileError
    ├── StalledError      a person must fix it: invalid spec, dependency cycle, bad signature
    │   └── SpecError     located problems in spec files (carries SpecProblem values)
    ├── WaitingError      a dependency is not healthy yet: try again shortly
    └── TransientError    git, NATS, runtime hiccups: retry with backoff
        ├── SourceError   fetching the spec repo or an artifact failed
        └── RuntimeFailure starting or stopping a process failed

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


class SpecError(StalledError):
    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class WaitingError(ReconcileError):
    """A precondition (a dependency's health) is not met yet."""


class TransientError(ReconcileError):
    """Expected to pass on its own: retry with backoff."""


class SourceError(TransientError):
    """The spec repository or an artifact could not be fetched."""


class SignatureError(StalledError):
    """A revision is unsigned or signed by a key that is not trusted."""


class ArtifactError(StalledError):
    """An artifact failed verification (sha256 mismatch, unsafe archive entry)."""


class RuntimeFailure(TransientError):
    """Starting, stopping or signalling an app's process failed."""
