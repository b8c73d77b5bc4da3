"""When a reconcile run is news: the event policy of the reconcile loop, as one pure function.

A run records `reconcile.started` the first time `is_news` holds for what it has learnt so
far (the loop asks after the fetch, after planning and after applying, so the event comes
before the `source.fetched` and `app.*` events it introduces), and `reconcile.finished` when
`answers_with_finished` holds. So:
- a run the agent's own schedule asked for (QUIET_REASONS) that finds nothing new records
  nothing: every 30 s on every node such events would bury the real ones;
- a run a person or a push asked for always answers with `reconcile.finished`;
- a source outage is reported when it starts, when its error changes, when someone asks,
  and when it ends, not on every retry.
"""

from __future__ import annotations

from dataclasses import dataclass

# Trigger reasons of the agent's own schedule ("rollout": a rollout entry changed, or a
# bake timer fired, while the node waits for its wave).
QUIET_REASONS = frozenset({"poll", "source retry", "rollout"})


@dataclass(frozen=True)
class RunSoFar:
    """What one run has learnt so far; fields stay at their defaults until known."""

    reason: str
    # this run's source failure (None: not failed, or not fetched yet)
    source_failure: str | None = None
    # the source failure reported before this run (None: the source was fine)
    known_failure: str | None = None
    fetched: str | None = None  # the revision this run fetched
    desired_revision: str | None = None  # the desired revision before this run
    applied_revision: str | None = None
    has_work: bool = False  # the plan has actions or metadata-only changes
    failed: bool = False  # the run's outcome is not a success


def is_news(run: RunSoFar) -> bool:
    """True when the run has something to report (see the module docstring)."""
    if run.source_failure is not None:
        return run.source_failure != run.known_failure or run.reason not in QUIET_REASONS
    if run.fetched is None:
        return False
    return (
        run.known_failure is not None  # the source recovered
        or run.fetched != run.desired_revision
        or run.fetched != run.applied_revision
        or run.has_work
        or run.failed
    )


def answers_with_finished(announced: bool, reason: str) -> bool:
    """Whether the run records `reconcile.finished`."""
    return announced or reason not in QUIET_REASONS
