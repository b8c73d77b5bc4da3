"""`plan`: what a reconcile would do, in order, without doing it (a thin I/O shell over the
git source, the loader and the planner); `plan --nats` is rollout_cmds.run_plan."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from reconciler.cli.spec_cmds import EXIT_ERROR, EXIT_OK, EXIT_PROBLEMS
from reconciler.core.errors import ArtifactError, ReconcileError
from reconciler.core.loader import LoadResult, SpecFile, load_files
from reconciler.core.plan import USUAL_MODES, Action, ActionKind, Plan, make_plan
from reconciler.core.rollout_spec import MAX_ROLLOUT_BYTES, ROLLOUT_FILE, RolloutSpec, parse_rollout
from reconciler.core.spec import NAME_RE
from reconciler.core.state import CurrentState, desired_for_node
from reconciler.core.targeting import parse_labels
from reconciler.node.source import GitSource
from reconciler.node.store import StoreError, load_current_state

ROLLOUTS_BUCKET_NAME = "gitops_rollouts"
# `plan --nats` (reconciler/cli/rollout_cmds.py) reads the node's rollout wave state over NATS:
# (args, revision, rollout spec, labels) -> (is the wave open, the rollout's state).
RolloutStateReader = Callable[
    [argparse.Namespace, str, RolloutSpec, dict[str, str]], tuple[bool | None, str | None]]

_SYMBOLS = {
    ActionKind.DEPLOY: "+",
    ActionKind.UPGRADE: "~",
    ActionKind.RECONFIGURE: "~",
    ActionKind.RESTART: "↻",
    ActionKind.REMOVE: "-",
}


def run_plan(args: argparse.Namespace, read_rollout_state: RolloutStateReader | None = None
             ) -> int:
    """`plan`; with `read_rollout_state` (plan --nats) it also says whether the node's wave
    is open."""
    try:
        if not NAME_RE.match(args.node_id):
            raise ValueError(f"--node-id {args.node_id!r}: use lowercase letters, digits and "
                             "'-' (node ids become NATS subject tokens)")
        labels = _labels(args.label)
        with tempfile.TemporaryDirectory(prefix="gitops-mesh-plan-") as cache:
            revision, files, rollout_data = _read_repo(args.repo, args.branch, args.path,
                                                       Path(cache))
        current = _current_state(Path(args.state_dir) if args.state_dir else None)
    except (ReconcileError, ValueError, OSError) as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return EXIT_ERROR
    result: LoadResult = load_files(files, apps_path=args.path)
    desired = desired_for_node(result, args.node_id, labels, revision)
    plan = make_plan(desired, current)
    rollout = rollout_position(rollout_data, revision, args.node_id, labels, args,
                               read_rollout_state)
    if args.json:
        out = plan.to_json()
        out["node"] = args.node_id
        out["labels"] = labels
        out["problems"] = [str(p) for p in desired.problems]
        out["rollout"] = rollout
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, args.node_id, labels, [str(p) for p in desired.problems]))
        if rollout["governed"]:
            print("\n" + str(rollout["text"]))
    return EXIT_PROBLEMS if desired.problems else EXIT_OK


def _labels(items: list[str]) -> dict[str, str]:
    try:
        return parse_labels(items)
    except ValueError as exc:
        raise ValueError(f"--label: {exc}") from None


def _read_repo(url: str, branch: str, apps_path: str, cache: Path
               ) -> tuple[str, list[SpecFile], bytes | None]:
    """(revision, spec files, rollout.yaml bytes or None)."""
    source = GitSource(url, branch, cache / "repo")
    try:
        revision = source.fetch()
        try:
            rollout: bytes | None = source.read_file(revision, ROLLOUT_FILE, MAX_ROLLOUT_BYTES)
        except ArtifactError as exc:
            rollout = None if "no such file" in str(exc) else str(exc).encode()
        return revision, source.spec_files(revision, apps_path), rollout
    finally:
        source.close()


def rollout_position(data: bytes | None, revision: str, node: str, labels: dict[str, str],
                     args: argparse.Namespace, read_state: RolloutStateReader | None = None,
                     ) -> dict[str, object]:
    """The node's wave at `revision` and whether it is open (read from gitops_rollouts by
    `read_state`, given with --nats; otherwise the plan says it cannot tell)."""
    if data is None:
        return {"governed": False,
                "text": f"Rollout: no {ROLLOUT_FILE} at {revision[:12]}: every node applies "
                        "it at once."}
    spec, problems = parse_rollout(ROLLOUT_FILE, data)
    if spec is None:
        return {"governed": True, "problems": [str(p) for p in problems],
                "text": f"Rollout: {ROLLOUT_FILE} is invalid (nodes do not apply this "
                        "revision): " + "; ".join(str(p) for p in problems[:3])}
    wave = spec.waves[spec.wave_of(labels)].name
    out: dict[str, object] = {"governed": True, "wave": wave, "open": None}
    where = f"Rollout: {node} is in wave {wave!r} of {len(spec.waves)}"
    if read_state is None or not getattr(args, "nats", None):
        out["text"] = (f"{where}; whether it is open is not known here (give --nats to read "
                       f"the rollout state from {ROLLOUTS_BUCKET_NAME})")
        return out
    try:
        is_open, state = read_state(args, revision, spec, labels)
    except Exception as exc:  # NATS trouble: say so, the plan itself stands
        out["text"] = f"{where}; the rollout state cannot be read: {exc}"
        return out
    out.update(open=is_open, state=state)
    if state is None:
        out["text"] = f"{where}; no node has started the rollout yet (the first wave opens)"
    else:
        out["text"] = f"{where}; rollout {state}, wave {'open' if is_open else 'not open'}"
    return out


def _current_state(state_dir: Path | None) -> CurrentState:
    """What runs on this node per the agent's store; nothing when there is no store there."""
    if state_dir is None or not state_dir.is_dir():
        return CurrentState()
    try:
        return load_current_state(state_dir)
    except StoreError as exc:
        raise ValueError(f"--state-dir: {exc}") from exc


def _line(action: Action) -> str:
    symbol = _SYMBOLS[action.kind]
    if action.kind is ActionKind.UPGRADE:
        what = f"{action.app} {action.from_version} -> {action.to_version}"
    elif action.kind is ActionKind.REMOVE:
        what = f"{action.app} {action.from_version}"
    else:
        what = f"{action.app} {action.to_version}"
    how = action.kind.value
    if action.mode is not USUAL_MODES[action.kind]:  # e.g. "upgrade (reinstall)"
        how += f" ({action.mode.value})"
    return f"  {symbol} {what:<36} {how}: {action.reason}"


def format_plan(plan: Plan, node: str, labels: dict[str, str], problems: list[str]) -> str:
    """Human plan in the spirit of `terraform plan`: removals, then each generation."""
    shown_labels = ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "no labels"
    lines = [f"Plan for node {node} ({shown_labels}) at revision {plan.revision[:12]}", ""]
    if problems:
        lines.append(f"Spec problems at this revision ({len(problems)}):")
        lines += [f"  {p}" for p in problems]
        lines.append("")
    removals = plan.removals()
    if removals:
        lines.append("Removals (dependents first):")
        lines += [_line(a) for a in removals]
        lines.append("")
    for index, generation in enumerate(plan.generations(), start=1):
        deps = sorted({d for a in generation for d in a.depends_on})
        after = f" (after {', '.join(deps)})" if deps else ""
        lines.append(f"Generation {index}{after}:")
        lines += [_line(a) for a in generation]
        lines.append("")
    if plan.held:
        lines.append("Held:")
        lines += [f"  ! {h.app:<36} {h.reason}" for h in plan.held]
        lines.append("")
    if plan.unchanged:
        lines.append("Unchanged: " + ", ".join(plan.unchanged))
        lines.append("")
    if plan.empty and not plan.held:
        lines.append("No changes: the node matches the spec tree.")
        lines.append("")
    counts = {kind: 0 for kind in ActionKind}
    for action in plan.actions:
        counts[action.kind] += 1
    lines.append(
        f"Plan: {counts[ActionKind.DEPLOY]} to deploy, {counts[ActionKind.UPGRADE]} to upgrade, "
        f"{counts[ActionKind.RECONFIGURE]} to reconfigure, {counts[ActionKind.RESTART]} to "
        f"restart, {counts[ActionKind.REMOVE]} to remove, {len(plan.held)} held, "
        f"{len(plan.unchanged)} unchanged."
    )
    return "\n".join(lines)
