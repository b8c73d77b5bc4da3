"""The one status builder (core.status), typed node meta, fitting a message, and the run
event policy (core.runs): pure, table-driven, whole values."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from reconciler.core.runs import RunSoFar, answers_with_finished, is_news
from reconciler.core.spec import AppSpec
from reconciler.core.status import (
    AppFacts,
    AppStatus,
    NodeMeta,
    NodeStatus,
    RunFacts,
    fit_status,
    node_status,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
WEB = AppSpec.model_validate({"name": "web", "version": "2", "run": {"command": ["web"]},
                              "labels": {"team": "a"}, "layer": "front"})
JOB = AppSpec.model_validate({"name": "files", "version": "1"})
META = NodeMeta(node_id="n1", labels={"role": "edge"}, agent_version="0.1.0",
                applied_revision="r1", desired_revision="r1")


def facts(spec: AppSpec, **changes: object) -> AppFacts:
    values: dict[str, object] = {"name": spec.name, "version": spec.version, "phase": "running",
                                 "health": "unknown", "message": "", "spec": spec,
                                 "alive": True}
    values.update(changes)
    return AppFacts(**values)  # type: ignore[arg-type]


def app(spec: AppSpec, **changes: object) -> AppStatus:
    values: dict[str, object] = {
        "name": spec.name, "version": spec.version, "phase": "running", "health": "healthy",
        "layer": spec.layer, "labels": dict(spec.labels), "depends_on": list(spec.depends_on)}
    values.update(changes)
    return AppStatus.model_validate(values)


def expected(**changes: object) -> NodeStatus:
    values: dict[str, object] = {
        "node": "n1", "labels": {"role": "edge"}, "revision": "r1", "status": "synced",
        "message": "all apps running and healthy", "apps": [],
        "updated_at": "2026-12-01T12:00:00.000Z", "agent_version": "0.1.0",
        "desired_revision": "r1"}
    values.update(changes)
    return NodeStatus.model_validate(values)


STATUS_CASES = [
    pytest.param(META, [facts(WEB, pid=7, started_at=NOW.timestamp() - 60, uptime_s=60.04)],
                 None,
                 expected(apps=[app(WEB, pid=7, started_at="2026-12-01T11:59:00.000Z",
                                    uptime_s=60.0)]),
                 id="a live app without a probe is healthy"),
    pytest.param(META, [facts(WEB, alive=False, health="healthy")], None,
                 expected(status="degraded", message="unhealthy: web",
                          apps=[app(WEB, health="unhealthy", message="process not running")]),
                 id="a dead process is unhealthy whatever its last probe said"),
    pytest.param(META, [facts(JOB, alive=False)], None,
                 expected(apps=[app(JOB, health="unknown")]),
                 id="an app that runs nothing is not judged by a process"),
    pytest.param(NodeMeta(**{**META.__dict__, "suspended": True}), [facts(WEB)], None,
                 expected(status="suspended",
                          message="reconciliation suspended by an operator", apps=[app(WEB)]),
                 id="suspended"),
    pytest.param(NodeMeta(**{**META.__dict__, "desired_revision": "r2"}), [facts(WEB)],
                 RunFacts(reconciling=True, run_id="run1", heartbeat_interval_s=5),
                 expected(status="progressing", message="reconciling", desired_revision="r2",
                          run_id="run1", heartbeat_interval_s=5, apps=[app(WEB)]),
                 id="reconciling towards a new revision"),
    pytest.param(NodeMeta(**{**META.__dict__, "source_error": "git: timeout",
                             "spec_errors": ("a.yaml:1:1: bad",), "outbox_dropped": 3}),
                 [], None,
                 expected(status="degraded", message="source: git: timeout",
                          source_error="git: timeout", spec_errors=["a.yaml:1:1: bad"],
                          outbox_dropped=3),
                 id="source and spec problems"),
]


@pytest.mark.parametrize(("meta", "apps", "run", "want"), STATUS_CASES)
def test_node_status_is_built_from_facts(
    meta: NodeMeta, apps: list[AppFacts], run: RunFacts | None, want: NodeStatus
) -> None:
    assert node_status(meta, apps, now=NOW, outbox_backlog=0, run=run) == want


def test_node_meta_round_trips_through_its_stored_rows() -> None:
    meta = NodeMeta(node_id="n1", labels={"b": "2", "a": "1"}, agent_version="1",
                    applied_revision="r1", desired_revision="r2", source_error="down",
                    spec_errors=("x", "y"), suspended=True, last_reconcile_at="t",
                    last_reconcile_ms=12.5, outbox_dropped=4)
    rows = {k: v for k, v in meta.to_rows().items() if v is not None}
    assert rows["node_suspended"] == "1" and rows["labels"] == '{"a": "1", "b": "2"}'
    assert NodeMeta.from_rows(rows) == meta
    assert NodeMeta.from_rows({}) == NodeMeta()
    # unreadable values read as absent, not as a crash
    assert NodeMeta.from_rows({"labels": "[", "last_reconcile_ms": "x"}) == NodeMeta()


def test_fit_status_keeps_a_big_node_within_one_message() -> None:
    apps = [app(WEB, name=f"app{i:04d}", message="m" * 2000, labels={"team": "x" * 60})
            for i in range(3000)]
    apps[1234] = apps[1234].model_copy(update={"phase": "failed"})
    big = expected(apps=apps, status="failed", message="failed or blocked: app1234")
    fitted = fit_status(big, 64 * 1024)
    assert len(fitted.to_json_bytes()) <= 64 * 1024
    assert fitted.apps[0].name == "app1234" and fitted.apps_omitted > 0
    assert fitted.apps_omitted + len(fitted.apps) == 3000
    small = expected(apps=[app(WEB)])
    assert fit_status(small, 64 * 1024) == small


NEWS = [
    (RunSoFar("poll"), False),
    (RunSoFar("poll", fetched="r1", desired_revision="r1", applied_revision="r1"), False),
    (RunSoFar("rpc", fetched="r1", desired_revision="r1", applied_revision="r1"), False),
    (RunSoFar("poll", fetched="r2", desired_revision="r1", applied_revision="r1"), True),
    (RunSoFar("poll", fetched="r1", desired_revision="r1", applied_revision="r1",
              has_work=True), True),
    (RunSoFar("poll", fetched="r1", desired_revision="r1", applied_revision="r1",
              failed=True), True),
    (RunSoFar("poll", fetched="r1", desired_revision="r1", applied_revision="r1",
              known_failure="down"), True),  # the source recovered
    (RunSoFar("poll", source_failure="down", known_failure="down"), False),  # same outage
    (RunSoFar("source retry", source_failure="down", known_failure="down"), False),
    (RunSoFar("rpc", source_failure="down", known_failure="down"), True),  # someone asked
    (RunSoFar("poll", source_failure="refused", known_failure="down"), True),  # new error
]


@pytest.mark.parametrize(("run", "news"), NEWS)
def test_when_a_run_is_news(run: RunSoFar, news: bool) -> None:
    assert is_news(run) is news


def test_who_gets_a_reconcile_finished() -> None:
    assert [answers_with_finished(a, r) for a, r in
            [(False, "poll"), (False, "source retry"), (False, "rpc"), (True, "poll")]] == [
        False, False, True, True]
