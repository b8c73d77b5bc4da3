"""Pure mesh decisions: request bodies, repo matching, fleet rows, wait verdicts, auth perms."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from reconciler.core.redact import redact_url
from reconciler.core.spec import Selector
from reconciler.core.status import AppStatus, NodeStatus
from reconciler.mesh.link import NatsOptions
from reconciler.mesh.permissions import (
    Permissions,
    node_permissions,
    notifier_permissions,
    permissions_for,
)
from reconciler.mesh.subjects import event_subject, node_from_event_subject, rpc_subject
from reconciler.mesh.wire import (
    BadRequest,
    Observed,
    SourceChanged,
    WaitVerdict,
    fleet_rows,
    normalize_repo_url,
    parse_app_body,
    parse_fleet_request,
    parse_selector,
    parse_source_changed,
    revision_matches,
    selector_from_pairs,
    source_matches,
    wait_targets,
    wait_verdict,
)

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
OLD = "a" * 40
NEW = "b" * 40


def status(node: str, state: str = "synced", rev: str | None = NEW, age: float = 1.0,
           **kw: object) -> Observed:
    st = NodeStatus(
        node=node, status=state, revision=rev, heartbeat_interval_s=10.0,
        updated_at=(NOW - timedelta(seconds=age)).isoformat(), **kw,  # type: ignore[arg-type]
    )
    return Observed(st)


def test_subjects() -> None:
    assert rpc_subject("n1", "status") == "gitops.rpc.n1.status"
    assert event_subject("n1", "reconcile.started") == "gitops.events.n1.reconcile.started"
    assert node_from_event_subject("gitops.events.n1.app.deployed") == "n1"
    assert node_from_event_subject("gitops.rpc.n1.status") is None


@pytest.mark.parametrize(
    ("data", "result"),
    [(b"", None), (b"{}", None), (b"null", None), (b'{"app": "web"}', "web")],
)
def test_app_body_accepts(data: bytes, result: str | None) -> None:
    assert parse_app_body(data, ["web", "db"]) == result


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{nope", "invalid JSON body"),
        (b"[1]", "body must be a JSON object, got list"),
        (b'{"app": 3}', "'app' must be a string, got int"),
        (b'{"app": "cache"}', "unknown app 'cache'; this node has: db, web"),
        (b'{"app": "Bad Name"}', "'app' 'Bad Name' is not a valid app name"),
        (b'{"ap": "web"}', "unknown field(s) ap; expected app"),
        (b"\xff\xfe", "invalid JSON body"),
    ],
)
def test_app_body_rejects_with_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_app_body(data, ["web", "db"])


def test_fleet_request_bodies() -> None:
    assert parse_fleet_request(b"") is None
    assert parse_fleet_request(b'{"selector": {"match": {"role": "edge"}}}') == Selector(
        match={"role": "edge"}
    )
    assert parse_fleet_request(b'{"selector": {"in": {"site": ["a", "b"]}}}') == Selector(
        **{"in": {"site": ["a", "b"]}}
    )
    # the contract's literal shape: a plain label map is a match selector
    assert parse_fleet_request(b'{"selector": {"role": "edge", "site": "a"}}') == Selector(
        match={"role": "edge", "site": "a"}
    )
    assert parse_fleet_request(b'{"selector": {}}') == Selector()  # no clause: every node
    assert parse_fleet_request(b'{"selector": null}') is None
    assert parse_selector({"role": "edge"}) == parse_selector({"match": {"role": "edge"}})
    with pytest.raises(BadRequest, match="invalid selector: label 'bogus' must be a string"):
        parse_fleet_request(b'{"selector": {"bogus": 1}}')
    with pytest.raises(BadRequest, match="invalid selector: role: Extra inputs"):
        parse_fleet_request(b'{"selector": {"match": {"zone": "a"}, "role": "edge"}}')
    with pytest.raises(BadRequest, match=r"invalid selector: match\.role"):
        parse_fleet_request(b'{"selector": {"match": {"role": 5}}}')
    with pytest.raises(BadRequest, match="'selector' must be an object"):
        parse_fleet_request(b'{"selector": "role=edge"}')


def test_selector_from_flags() -> None:
    assert selector_from_pairs([]) is None
    assert selector_from_pairs(["role=edge", "site = x"]) == Selector(
        match={"role": "edge", "site": "x"}
    )
    with pytest.raises(BadRequest, match="expected KEY=VALUE"):
        selector_from_pairs(["role"])


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("https://GitHub.com/org/repo.git", "github.com/org/repo"),
        ("https://github.com/org/repo/", "github.com/org/repo"),
        ("git@github.com:org/repo.git", "github.com/org/repo"),
        ("ssh://git@github.com:22/org/repo", "github.com/org/repo"),
        ("git://host/specs.git", "host/specs"),
        ("/srv/git/specs.git/", "/srv/git/specs"),
        ("file:///srv/git/specs.git", "/srv/git/specs"),
    ],
)
def test_repo_urls_normalise(url: str, normal: str) -> None:
    assert normalize_repo_url(url) == normal


def test_source_changed_matching() -> None:
    change = parse_source_changed(
        b'{"repo": "git@github.com:org/specs.git", "branch": "refs/heads/main", "revision": "x"}'
    )
    assert change == SourceChanged("git@github.com:org/specs.git", "refs/heads/main", "x")
    assert source_matches(change, "https://github.com/org/specs", "main")
    assert not source_matches(change, "https://github.com/org/specs", "prod")
    assert not source_matches(change, "https://github.com/org/other", "main")
    with pytest.raises(BadRequest, match="'revision' must be a non-empty string"):
        parse_source_changed(b'{"repo": "r", "branch": "main"}')


def test_revision_prefix_matching() -> None:
    assert revision_matches(NEW, NEW)
    assert revision_matches(NEW, "bbbbbbb")
    assert not revision_matches(NEW, "bbb")  # too short to mean anything
    assert not revision_matches(None, NEW)
    assert not revision_matches(OLD, "bbbbbbb")


def test_fleet_rows_derive_unreachable_from_heartbeat_age() -> None:
    fleet = {
        "n2": status("n2", age=31.0, labels={"role": "edge"}),
        "n1": status("n1", state="degraded", message="unhealthy: web"),
    }
    assert fleet_rows(fleet, NOW) == [
        {"node": "n1", "status": "degraded", "revision": NEW[:12], "apps": 0, "labels": "",
         "age_s": 1.0, "message": "unhealthy: web"},
        {"node": "n2", "status": "unreachable", "revision": NEW[:12], "apps": 0,
         "labels": "role=edge", "age_s": 31.0, "message": ""},
    ]


def test_wait_targets_by_selector_or_explicit_nodes() -> None:
    fleet = {
        "e1": status("e1", labels={"role": "edge"}),
        "g1": status("g1", labels={"role": "gateway"}),
    }
    assert wait_targets(fleet, [], Selector(match={"role": "edge"})) == ["e1"]
    assert wait_targets(fleet, [], None) == ["e1", "g1"]
    assert wait_targets(fleet, ["x9", "e1"], None) == ["e1", "x9"]


def test_wait_verdicts() -> None:
    fleet = {
        "ok": status("ok"),
        "old": status("old", rev=OLD),  # synced, but has not fetched the push yet
        "busy": status("busy", state="progressing", desired_revision=NEW, rev=OLD),
        "bad": status("bad", state="failed", message="failed or blocked: web", apps=[
            AppStatus(name="web", version="2", phase="failed", message="exited with 3"),
            AppStatus(name="db", version="1", phase="running", message="ok"),
        ]),
        "bad2": status("bad2", state="degraded", rev=OLD, desired_revision=NEW,
                       spec_errors=["apps/x.yaml:1:1: bad"]),
        "gone": status("gone", rev=OLD, age=100.0),
    }
    verdict = wait_verdict(fleet, sorted([*fleet, "never"]), NEW[:8], NOW)
    assert verdict == WaitVerdict(
        done=False,
        synced=("ok",),
        failed={
            "bad": "failed or blocked: web; web: exited with 3",
            "bad2": "spec errors: apps/x.yaml:1:1: bad",
        },
        pending={
            "busy": f"progressing at {OLD[:12]}",
            "gone": "unreachable (no heartbeat for 100s)",
            "never": "no status in gitops_nodes (never reported)",
            "old": f"synced at {OLD[:12]}",
        },
    )
    done = wait_verdict(fleet, ["ok", "bad"], NEW, NOW)
    assert done.done and not done.ok


def test_nats_options_never_show_secrets() -> None:
    opts = NatsOptions(servers=["nats://u:secret@h1:4222", "nats://h2:4222"], password="pw")
    assert opts.describe() == "nats://h1:4222,nats://h2:4222"
    assert redact_url("nats://tok@h:1") == "nats://h:1"
    assert "pw" not in repr(opts.describe())


def test_node_permissions_are_exactly_its_own() -> None:
    assert node_permissions("n1") == Permissions(
        publish=(
            "gitops.events.n1.>",
            "$KV.gitops_nodes.n1",
            "$JS.API.STREAM.INFO.GITOPS_EVENTS",
            "$JS.API.STREAM.INFO.KV_gitops_nodes",
            # rollouts: CAS any revision's entry, watch it, read the fleet's statuses
            "$KV.gitops_rollouts.*",
            "$KV.gitops_rollouts.*.n1",  # its own report keys <sha>.n1
            "$JS.API.STREAM.INFO.KV_gitops_rollouts",
            "$JS.API.STREAM.MSG.GET.KV_gitops_rollouts",
            "$JS.API.DIRECT.GET.KV_gitops_rollouts",
            "$JS.API.DIRECT.GET.KV_gitops_rollouts.>",
            "$JS.API.CONSUMER.CREATE.KV_gitops_rollouts",
            "$JS.API.CONSUMER.CREATE.KV_gitops_rollouts.>",
            "$JS.API.CONSUMER.DELETE.KV_gitops_rollouts.*",
            "$JS.API.CONSUMER.INFO.KV_gitops_rollouts.*",
            "$JS.API.STREAM.MSG.GET.KV_gitops_nodes",
            "$JS.API.DIRECT.GET.KV_gitops_nodes",
            "$JS.API.DIRECT.GET.KV_gitops_nodes.>",
            "$JS.API.CONSUMER.CREATE.KV_gitops_nodes",
            "$JS.API.CONSUMER.CREATE.KV_gitops_nodes.>",
            "$JS.API.CONSUMER.DELETE.KV_gitops_nodes.*",
            "$JS.API.CONSUMER.INFO.KV_gitops_nodes.*",
            "$JS.FC.>",
        ),
        subscribe=(
            "gitops.rpc.n1.>",
            "$SRV.>",
            "gitops.fleet.reconcile",
            "gitops.source.changed",
            "_INBOX.n1.>",
        ),
        allow_responses=True,
    )
    # no identity but admin may manage streams: denied outright (a deny beats any allow)
    for identity in ("n1", "console", "observer", "notifier"):
        denied = permissions_for(identity).to_conf()["publish"]["deny"]
        assert {"$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.UPDATE.>",
                "$JS.API.STREAM.DELETE.>", "$JS.*.API.STREAM.CREATE.>"} <= set(denied)
    assert "deny" not in permissions_for("admin").to_conf()["publish"]
    assert notifier_permissions() == Permissions(publish=("gitops.source.changed",),
                                                 subscribe=())
