"""Pure rollout decisions (reconciler.core.rollout) and the rollout.yaml model: table-driven,
whole values asserted, the clock injected."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from reconciler.core import rollout as ro
from reconciler.core.events import iso_time
from reconciler.core.rollout_spec import RolloutSpec, parse_rollout, resolve_count

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
REV = "a" * 40
BASE = "b" * 40

SPEC = RolloutSpec.model_validate({
    "waves": [
        {"name": "canary", "nodes": {"match": {"ring": "canary"}}, "max_unavailable": 1},
        {"name": "fleet", "nodes": {}, "max_unavailable": "50%"},
    ],
    "bake": "10s", "progress_deadline": "60s", "max_failed": 0, "revert": True,
})


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def fleet(canaries: int = 1, others: int = 4, offline: tuple[str, ...] = ()
          ) -> dict[str, ro.Member]:
    members = {f"c{i}": ro.Member({"ring": "canary"}, f"c{i}" not in offline)
               for i in range(canaries)}
    members |= {f"n{i}": ro.Member({}, f"n{i}" not in offline) for i in range(others)}
    return members


def entry() -> ro.RolloutEntry:
    return ro.new_entry(REV, SPEC, BASE, T0)


@pytest.mark.parametrize(("labels", "wave"), [
    ({"ring": "canary"}, 0), ({"ring": "canary", "x": "y"}, 0), ({}, 1), ({"ring": "b"}, 1),
])
def test_a_node_is_in_the_first_matching_wave_else_the_last(labels: dict, wave: int) -> None:
    assert SPEC.wave_of(labels) == wave
    assert entry().wave_of(labels) == wave
    only_canary = RolloutSpec.model_validate(
        {"waves": [{"name": "canary", "nodes": {"match": {"ring": "canary"}}}]})
    assert only_canary.wave_of(labels) == 0  # no match: the last wave


@pytest.mark.parametrize(("value", "total", "one", "expected"), [
    (1, 10, True, 1), ("50%", 10, True, 5), ("25%", 3, True, 1), ("25%", 3, False, 0),
    ("100%", 7, True, 7), (0, 5, False, 0), ("10%", 100, False, 10), ("33%", 3, False, 0),
])
def test_counts_and_percentages(value: int | str, total: int, one: bool, expected: int) -> None:
    assert resolve_count(value, total, at_least_one=one) == expected


def test_new_entry_opens_the_first_wave() -> None:
    e = entry()
    assert e.model_dump() == {
        "revision": REV, "state": "progressing", "wave": "canary", "wave_index": 0,
        "waves": [
            {"name": "canary", "selector": SPEC.waves[0].nodes.model_dump(),
             "max_unavailable": 1, "nodes": [], "synced": [], "failed": [], "offline": [],
             "opened_at": iso_time(T0), "synced_at": None, "baked_at": None},
            {"name": "fleet", "selector": SPEC.waves[1].nodes.model_dump(),
             "max_unavailable": "50%", "nodes": [], "synced": [], "failed": [], "offline": [],
             "opened_at": None, "synced_at": None, "baked_at": None},
        ],
        "applying": {}, "failures": {}, "reason": "", "base": BASE, "bake_s": 10.0,
        "progress_deadline_s": 60.0, "max_failed": 0, "revert": True, "superseded_by": None,
        "created_at": iso_time(T0), "updated_at": iso_time(T0), "transitions": 0,
        "placed": True,
    }
    assert ro.RolloutEntry.from_json(e.to_json_bytes()) == e


def test_may_apply_table() -> None:
    members = fleet()
    step, verdict = ro.consult(entry(), "n0", members, at(1))
    assert verdict == ro.Verdict(
        "wait", f"waiting for wave fleet of rollout {REV[:12]} (wave canary open: 0/1 synced)")
    assert verdict.state == "progressing"
    assert step.entry.applying == {}
    assert step.entry.waves[0].nodes == ["c0"] and step.entry.waves[1].nodes == [
        "n0", "n1", "n2", "n3"]
    step, verdict = ro.consult(step.entry, "c0", members, at(2))
    assert verdict == ro.Verdict("apply")
    assert step.entry.applying == {"c0": iso_time(at(2))}
    # a second canary would find no slot (max_unavailable 1)
    two = fleet(canaries=2)
    _s2, v2 = ro.consult(ro.advance(step.entry, two, at(2)).entry, "c1", two, at(3))
    assert v2.kind == "wait" and "no slot free (1 applying, max_unavailable 1)" in v2.message
    # already applying: apply again (an agent restart)
    assert ro.consult(step.entry, "c0", members, at(3))[1] == ro.Verdict("apply")


def test_bake_then_next_wave_opens_with_one_event() -> None:
    members = fleet()
    e = ro.consult(entry(), "c0", members, at(1))[0].entry
    step = ro.report(e, "c0", "synced", "", members, at(5))
    e = step.entry
    assert step.events == ()
    assert e.waves[0].synced == ["c0"] and e.waves[0].synced_at == iso_time(at(5))
    assert ro.recheck_in(e, at(6)) == 9.0
    assert ro.bake_left(e, at(6)) == 9.0
    assert ro.advance(e, members, at(14.9)).entry == e  # still baking: no change, no write
    step = ro.advance(e, members, at(15))
    assert [ev.type for ev in step.events] == ["rollout.wave-opened"]
    assert step.events[0].message == "wave fleet opened (wave canary synced and baked 10s)"
    opened = step.entry
    assert (opened.wave, opened.wave_index, opened.waves[0].baked_at,
            opened.waves[1].opened_at) == ("fleet", 1, iso_time(at(15)), iso_time(at(15)))
    # half of the fleet wave may apply at once (50% of 4)
    e = opened
    verdicts = []
    for node in ("n0", "n1", "n2"):
        step, verdict = ro.consult(e, node, members, at(16))
        e = step.entry
        verdicts.append(verdict.kind)
    assert verdicts == ["apply", "apply", "wait"]
    for node in ("n0", "n1"):
        e = ro.report(e, node, "synced", "", members, at(17)).entry
    for node in ("n2", "n3"):
        e = ro.consult(e, node, members, at(18))[0].entry
    assert sorted(e.applying) == ["n2", "n3"]
    e = ro.report(e, "n2", "synced", "", members, at(19)).entry
    step = ro.report(e, "n3", "synced", "", members, at(20))
    assert step.entry.state == "complete" and step.entry.wave is None
    assert [ev.type for ev in step.events] == ["rollout.completed"]
    assert ro.consult(step.entry, "late", {"late": ro.Member({})}, at(30))[1].kind == "apply"


def test_failure_aborts_beyond_max_failed() -> None:
    members = fleet()
    e = ro.consult(entry(), "c0", members, at(1))[0].entry
    step = ro.report(e, "c0", "failed", "api: health check failed", members, at(4))
    assert step.entry.state == "aborted"
    assert step.entry.reason == ("1 node(s) failed, more than max_failed 0: c0: api: health "
                                 "check failed")
    assert [ev.type for ev in step.events] == ["rollout.aborted"]
    for node in ("c0", "n1"):
        verdict = ro.consult(step.entry, node, members, at(5))[1]
        assert verdict == ro.Verdict("aborted", f"rollout of {REV[:12]} aborted: "
                                                f"{step.entry.reason}", base=BASE, revert=True,
                                     state="aborted")


def test_tolerated_failures_do_not_abort() -> None:
    spec = SPEC.model_copy(update={"max_failed": "50%"})
    members = fleet()
    e = ro.new_entry(REV, spec, BASE, T0)
    e = ro.consult(e, "c0", members, at(1))[0].entry
    e = ro.report(e, "c0", "failed", "boom", members, at(2)).entry
    assert e.state == "progressing" and e.waves[0].synced_at == iso_time(at(2))


def test_progress_deadline_counts_a_slow_node_failed() -> None:
    members = fleet()
    e = ro.consult(entry(), "c0", members, at(0))[0].entry
    assert ro.recheck_in(e, at(0)) == 60.0
    assert ro.advance(e, members, at(60)).entry == e
    step = ro.advance(e, members, at(61))
    assert step.entry.applying == {}
    assert step.entry.failures == {"c0": "not synced within progress_deadline 1m"}
    assert step.entry.state == "aborted"


def test_offline_nodes_do_not_hold_the_wave_and_join_later() -> None:
    members = fleet(others=2, offline=("n1",))
    e = ro.consult(entry(), "c0", members, at(0))[0].entry
    e = ro.report(e, "c0", "synced", "", members, at(1)).entry
    e = ro.advance(e, members, at(11)).entry
    assert e.wave == "fleet" and e.waves[1].offline == ["n1"]
    e = ro.consult(e, "n0", members, at(12))[0].entry
    step = ro.report(e, "n0", "synced", "", members, at(13))
    assert step.entry.state == "complete"
    assert step.entry.waves[1].offline == ["n1"]
    # n1 comes back after completion: it applies
    back = {**members, "n1": ro.Member({}, True)}
    assert ro.consult(step.entry, "n1", back, at(20))[1].kind == "apply"


def test_offline_node_back_during_its_wave_holds_it_again() -> None:
    members = fleet(others=2, offline=("n1",))
    e = ro.consult(entry(), "c0", members, at(0))[0].entry
    e = ro.report(e, "c0", "synced", "", members, at(1)).entry
    e = ro.advance(e, members, at(11)).entry
    e = ro.consult(e, "n0", members, at(12))[0].entry
    back = {**members, "n1": ro.Member({}, True)}
    e = ro.report(e, "n0", "synced", "", back, at(13)).entry
    assert e.state == "progressing" and e.waves[1].pending() == ["n1"]
    step, verdict = ro.consult(e, "n1", back, at(14))
    assert verdict.kind == "apply"
    assert ro.report(step.entry, "n1", "synced", "", back, at(15)).entry.state == "complete"


def test_a_wave_with_no_online_node_is_skipped_without_bake() -> None:
    members = fleet(canaries=1, others=1, offline=("c0",))
    step = ro.advance(entry(), members, at(1))
    assert step.entry.wave == "fleet"
    assert [ev.message for ev in step.events] == [
        "wave fleet opened (wave canary has no online node)"]


@pytest.mark.parametrize(("action", "state", "events"), [
    ("pause", "paused", ["rollout.paused"]),
    ("abort", "aborted", ["rollout.aborted"]),
    ("promote", "progressing", ["rollout.wave-opened"]),
])
def test_operator_actions(action: str, state: str, events: list[str]) -> None:
    placed = ro.advance(entry(), fleet(), T0).entry
    step = ro.operate(placed, action, at(1), reason="" if action != "abort" else "bad build")
    assert step.entry.state == state
    assert [ev.type for ev in step.events] == events
    if action == "abort":
        assert step.entry.reason == "bad build"
    if action == "promote":
        assert step.entry.wave == "fleet" and step.entry.waves[0].baked_at == iso_time(at(1))


def test_pause_resume_and_refusals() -> None:
    placed = ro.advance(entry(), fleet(), T0).entry
    paused = ro.pause(placed, at(1)).entry
    verdict = ro.consult(paused, "c0", fleet(), at(2))[1]
    assert verdict.kind == "wait" and "paused" in verdict.message
    resumed = ro.resume(paused, at(3))
    assert resumed.entry.state == "progressing" and resumed.entry.reason == ""
    assert [ev.type for ev in resumed.events] == ["rollout.resumed"]
    with pytest.raises(ro.RolloutRefused, match="cannot resume a rollout that is progressing"):
        ro.resume(resumed.entry, at(4))
    with pytest.raises(ro.RolloutRefused, match="cannot pause a rollout that is paused"):
        ro.pause(paused, at(4))
    last = ro.promote(placed, at(1)).entry
    with pytest.raises(ro.RolloutRefused, match="the last wave"):
        ro.promote(last, at(2))
    aborted = ro.abort(entry(), at(1)).entry
    for action in ro.OPERATOR_ACTIONS:
        with pytest.raises(ro.RolloutRefused):
            ro.operate(aborted, action, at(2))


def test_event_ids_are_deterministic_and_distinct() -> None:
    placed = ro.advance(entry(), fleet(), T0).entry
    a = ro.pause(placed, at(1))
    b = ro.pause(placed, at(2))
    assert a.events[0].id == b.events[0].id  # the same transition: one id (stream dedup)
    again = ro.pause(ro.resume(a.entry, at(3)).entry, at(4))
    assert again.events[0].id != a.events[0].id


def test_superseded_and_base() -> None:
    step = ro.supersede(entry(), "c" * 40, at(1))
    assert (step.entry.state, step.entry.superseded_by, step.entry.reason) == (
        "aborted", "c" * 40, "superseded by cccccccccccc")
    assert ro.consult(step.entry, "c0", fleet(), at(2))[1].kind == "superseded"
    assert ro.supersede(step.entry, "d" * 40, at(3)).entry == step.entry
    done = entry().model_copy(update={"state": "complete"})
    assert ro.base_for(done, None) == REV
    assert ro.base_for(entry(), "x") == BASE
    assert ro.base_for(None, "x") == "x"


def test_progress_line() -> None:
    members = fleet()
    e = ro.consult(entry(), "c0", members, at(0))[0].entry
    assert ro.progress_line(e, at(1)) == (
        f"{REV[:12]} progressing: canary 0/1 (1 applying) | fleet 0/4 (waiting)")
    e = ro.report(e, "c0", "synced", "", members, at(1)).entry
    assert ro.progress_line(e, at(2)) == (
        f"{REV[:12]} progressing: canary 1/1 (baking 9s) | fleet 0/4 (waiting)")


@pytest.mark.parametrize(("text", "problems"), [
    ("waves:\n  - name: Canary\n", ["r.yaml:2:11: waves[0].name: invalid wave name 'Canary': "
                                    "use 1-63 lowercase letters, digits and '-', starting and "
                                    "ending with a letter or digit"]),
    ("waves:\n  - name: a\n    nodez: {}\n",
     ["r.yaml:3:5: waves[0].nodez: unknown field 'nodez'; did you mean 'nodes'?"]),
    ("waves:\n  - name: a\n    max_unavailable: 150%\n",
     ["r.yaml:3:22: waves[0].max_unavailable: '150%': a percentage is at most 100%"]),
    ("waves: []\n", ["r.yaml:1:8: waves: List should have at least 1 item after validation, "
                     "not 0"]),
    ("waves:\n  - name: a\n  - name: a\n", ["r.yaml:1:1: wave name 'a' is used twice"]),
    ("waves:\n  - name: a\nbake: soon\n",
     ["r.yaml:3:7: bake: invalid duration 'soon': use e.g. '500ms', '5s', '2m', '1h'"]),
    ("- 1\n", ["r.yaml:1:1: rollout.yaml must be a mapping (waves: [...], bake: ...)"]),
])
def test_rollout_yaml_errors_are_located(text: str, problems: list[str]) -> None:
    spec, found = parse_rollout("r.yaml", text.encode())
    assert spec is None
    assert [str(p) for p in found] == problems


def test_rollout_yaml_size_is_bounded() -> None:
    spec, found = parse_rollout("r.yaml", b"#" * 70_000)
    assert spec is None and "larger than" in str(found[0])


def test_only_nodes_of_this_repository_join_a_wave() -> None:
    """A node is placed when it wants the revision or still runs the base; nodes that
    follow another repository (never at those revisions) neither join nor hold a wave."""
    members = {
        "c0": ro.Member({"ring": "canary"}, True, (BASE,)),           # at the base
        "n0": ro.Member({}, True, (BASE, REV)),                        # fetched it already
        "n1": ro.Member({}, False, (BASE,)),                           # offline, at the base
        "other": ro.Member({}, True, ("f" * 40,)),                     # another repository
        "fresh": ro.Member({}, True, ("",)),                           # nothing applied yet
    }
    e = ro.advance(entry(), members, at(0)).entry
    assert [(w.nodes, w.offline) for w in e.waves] == [(["c0"], []), (["n0", "n1"], ["n1"])]
    # once placed, a node stays in the rollout whatever its status says next
    moved = {**members, "n0": ro.Member({}, True, ("f" * 40,))}
    assert ro.advance(e, moved, at(1)).entry.waves[1].nodes == ["n0", "n1"]


def test_a_node_at_an_earlier_commit_of_the_history_holds_its_wave() -> None:
    """A canary still at a superseded revision (neither the new one nor the base) is of this
    repository when git says its revision is an earlier commit: it is placed, and the fleet
    wave waits for it; without that word it would count as another repository's and the
    empty canary wave would open the fleet wave at once."""
    older = "c" * 40
    members = {"c0": ro.Member({"ring": "canary"}, True, (older,)),
               "n0": ro.Member({}, True, (BASE,)), "n1": ro.Member({}, True, (BASE, REV))}
    blind = ro.advance(entry(), members, at(0)).entry
    assert (blind.waves[0].nodes, blind.wave) == ([], "fleet")  # what went wrong
    assert ro.revisions_to_trace(members, REV, ()) == [BASE, older]
    assert ro.revisions_to_trace(members, REV, (BASE,)) == [older]
    traced = ro.with_history(members, {older})
    assert traced["c0"].same_history and not traced["n0"].same_history
    e = ro.advance(entry(), traced, at(0)).entry
    assert (e.waves[0].nodes, e.wave, e.waves[1].opened_at) == (["c0"], "canary", None)


def test_revisions_to_trace_are_bounded_most_common_first() -> None:
    members = {f"n{i}": ro.Member({}, True, (f"{i % 50:040x}",)) for i in range(200)}
    members["odd"] = ro.Member({}, True, ("e" * 40,))
    todo = ro.revisions_to_trace(members, REV, ())
    assert len(todo) == ro.MAX_TRACED_REVISIONS and "e" * 40 not in todo


def test_an_entry_created_before_the_fleet_is_read_opens_no_wave() -> None:
    """The first node to see a push creates the entry with only itself (cheap); no wave
    may open (an empty canary wave must not be skipped) until a fleet read placed all."""
    me = {"n0": ro.Member({})}
    unplaced = ro.new_entry(REV, SPEC, BASE, T0, placed=False)
    step, verdict = ro.consult(unplaced, "n0", me, at(1), fleet=False)
    assert verdict.kind == "wait" and step.entry.wave == "canary"
    assert (step.entry.placed, step.entry.waves[1].nodes, step.events) == (False, ["n0"], ())
    placed = ro.advance(step.entry, fleet(), at(2))
    assert placed.entry.placed and placed.entry.waves[0].nodes == ["c0"]
    assert placed.entry.wave == "canary"  # c0 still has to apply: nothing skipped


# ---- per-node reports folded into the entry ---------------------------------------------------

ALL_AT_ONCE = RolloutSpec.model_validate(
    {"waves": [{"name": "all", "nodes": {}, "max_unavailable": "100%"}], "bake": "0s"})


def one_wave(nodes: int = 4, offline: tuple[str, ...] = ()) -> tuple[ro.RolloutEntry,
                                                                      dict[str, ro.Member]]:
    members = {f"n{i}": ro.Member({}, f"n{i}" not in offline) for i in range(nodes)}
    return ro.advance(ro.new_entry(REV, ALL_AT_ONCE, BASE, T0), members, at(0)).entry, members


def synced(node: str, seconds: float = 1) -> ro.NodeReport:
    return ro.NodeReport(node=node, outcome="synced", at=iso_time(at(seconds)))


def test_folding_reports_gives_exact_counts_in_any_order_and_completes_once() -> None:
    e, members = one_wave(4)
    reports = {n: synced(n) for n in members}
    # a fold with some reports, then another with all of them (lost or late folds): the
    # same entry as one fold of all; folding again changes nothing (no write)
    partial = ro.fold(e, {n: reports[n] for n in ("n1", "n3")}, {}, at(2))
    assert (partial.entry.waves[0].synced, partial.entry.state, partial.events) == (
        ["n1", "n3"], "progressing", ())
    whole = ro.fold(e, reports, {}, at(3))
    again = ro.fold(partial.entry, reports, {}, at(3))
    assert whole.entry == again.entry
    assert (whole.entry.state, whole.entry.waves[0].synced) == ("complete", sorted(members))
    assert [ev.type for ev in whole.events] == ["rollout.completed"]
    assert ro.fold(whole.entry, reports, {}, at(4)) == ro.Step(whole.entry)
    # two folders racing: the loser computes again from the winner's entry: nothing to
    # announce twice
    assert ro.fold(again.entry, reports, {}, at(5)).events == ()


def test_a_failed_report_aborts_and_a_stale_one_is_left_out() -> None:
    limited = RolloutSpec.model_validate(
        {"waves": [{"name": "all", "nodes": {}, "max_unavailable": 1}], "max_failed": 0})
    members = {"n0": ro.Member({}), "n1": ro.Member({})}
    e = ro.advance(ro.new_entry(REV, limited, BASE, T0), members, at(0)).entry
    e = ro.consult(e, "n0", members, at(5))[0].entry  # n0 claims its slot at 5 s
    stale = ro.NodeReport(node="n0", outcome="failed", message="boom", at=iso_time(at(4)))
    assert ro.fold(e, {"n0": stale}, members, at(6)) == ro.Step(e)  # from before the claim
    failed = stale.model_copy(update={"at": iso_time(at(6))})
    step = ro.fold(e, {"n0": failed}, members, at(7))
    assert (step.entry.state, step.entry.failures, step.entry.applying) == (
        "aborted", {"n0": "boom"}, {})
    assert [ev.type for ev in step.events] == ["rollout.aborted"]


@pytest.mark.parametrize(("case", "due"), [
    ("fresh", None), ("stale", "progress"), ("shown", None), ("failed", "own"),
    ("slot", "own"), ("unplaced", "own"), ("complete", "own"),
    ("not yet placed", None), ("never placed", "place"),
])
def test_when_a_reporter_folds(case: str, due: str | None) -> None:
    e, _ = one_wave(3)
    node, outcome, now = "n0", "synced", at(0.5)
    if case == "stale":
        now = at(ro.FOLD_EVERY_S)
    elif case == "shown":
        e = ro.fold(e, {"n0": synced("n0")}, {}, at(0.2)).entry
    elif case == "failed":
        outcome = "failed"
    elif case == "slot":
        e = e.model_copy(update={"applying": {"n0": iso_time(at(0))}})
    elif case == "unplaced":
        node = "newcomer"
    elif case == "complete":
        e = e.model_copy(update={"state": "complete"})
    elif case in ("not yet placed", "never placed"):
        e = ro.new_entry(REV, ALL_AT_ONCE, BASE, T0, placed=False)
        now = at(ro.PLACE_AFTER_S if case == "never placed" else 1)
    assert ro.fold_due(e, node, outcome, now) == due  # type: ignore[arg-type]


def test_the_reports_that_complete_the_open_wave_are_seen_by_whoever_wrote_last() -> None:
    e, _ = one_wave(3, offline=("n2",))
    assert not ro.wave_reported(e, {"n0"})
    assert ro.wave_reported(e, {"n0", "n1"})  # the offline node does not hold the wave
    done = ro.fold(e, {n: synced(n) for n in ("n0", "n1")}, {}, at(1)).entry
    assert done.state == "complete" and not ro.wave_reported(done, {"n0", "n1"})
    assert not ro.wave_reported(ro.new_entry(REV, ALL_AT_ONCE, BASE, T0, placed=False),
                                {"n0"})
    # the offline node comes back and reports late: shown as synced, no longer offline
    late = ro.fold(done, {"n2": synced("n2", 9)}, {}, at(9)).entry
    assert (late.waves[0].synced, late.waves[0].offline) == (["n0", "n1", "n2"], [])
