"""`validate` and `schema` commands: thin I/O shells over the loader and the models."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from reconciler.core.errors import SpecProblem
from reconciler.core.events import event_json_schema
from reconciler.core.loader import LoadResult, SpecFile, load_files
from reconciler.core.rollout_spec import (
    MAX_ROLLOUT_BYTES,
    ROLLOUT_FILE,
    RolloutSpec,
    parse_rollout,
    rollout_json_schema,
)
from reconciler.core.spec import ArchiveSource, app_json_schema
from reconciler.node.spec_dir import read_directory, resolve_spec_path

# Exit codes: 0 fine, 1 spec problems (plan still printed, with removals held), 2 could not
# run at all (bad flags, unreachable repository).
EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2


def run_validate(args: argparse.Namespace) -> int:
    target = Path(args.path)
    if not target.exists():
        print(f"{args.path}: no such file or directory", file=sys.stderr)
        return EXIT_ERROR
    if target.is_file() and target.name == ROLLOUT_FILE:
        return _validate_rollout_only(target, args.json)
    root, apps_path = resolve_spec_path(target, args.apps_path)
    if apps_path and not (root / apps_path).exists():
        print(f"{root / apps_path}: no such file or directory", file=sys.stderr)
        return EXIT_ERROR
    files = read_directory(root, apps_path)
    # Paths as the user can open them from where they ran the command.
    shown = [SpecFile(str(root / f.path), f.data, f.key) for f in files]
    result = load_files(shown, apps_path=str(root / apps_path) if apps_path else str(root))
    if apps_path and (args.apps_path is not None or not target.is_file()):
        # Only from a repo root are repo-relative archive paths known to resolve right.
        result.problems.extend(check_archives(root, result))
        result.problems.sort()
    rollout_note = ""
    if apps_path and target.is_dir() and (root / ROLLOUT_FILE).is_file():
        # the repo root's rollout.yaml (outside the apps path) is part of the spec tree
        rollout, rollout_problems = _check_rollout(root / ROLLOUT_FILE)
        result.problems.extend(rollout_problems)
        result.problems.sort()
        rollout_note = f", {ROLLOUT_FILE}: " + (
            f"{_n(len(rollout.waves), 'wave')}" if rollout else "invalid")
    if args.json:
        print(json.dumps([_problem_json(p) for p in result.problems], indent=2))
    else:
        for problem in result.problems:
            print(problem)
    summary = (f"{_n(len(result.valid_apps), 'valid app')} in {_n(result.files, 'file')}"
               + rollout_note)
    if result.problems:
        summary += (
            f", {_n(len(result.problems), 'problem')} ({_n(len(result.invalid), 'app')} invalid)"
        )
    print(summary, file=sys.stderr)
    return EXIT_PROBLEMS if result.problems else EXIT_OK


def _check_rollout(path: Path) -> tuple[RolloutSpec | None, list[SpecProblem]]:
    with open(path, "rb") as handle:
        data = handle.read(MAX_ROLLOUT_BYTES + 1)
    return parse_rollout(str(path), data)


def _validate_rollout_only(path: Path, as_json: bool) -> int:
    rollout, problems = _check_rollout(path)
    if as_json:
        print(json.dumps([_problem_json(p) for p in problems], indent=2))
    else:
        for problem in problems:
            print(problem)
    if rollout is not None:
        print(f"{ROLLOUT_FILE}: {_n(len(rollout.waves), 'wave')}: "
              + ", ".join(w.name for w in rollout.waves), file=sys.stderr)
    else:
        print(f"{ROLLOUT_FILE}: {_n(len(problems), 'problem')}", file=sys.stderr)
    return EXIT_PROBLEMS if problems else EXIT_OK


def check_archives(root: Path, result: LoadResult) -> list[SpecProblem]:
    """Repo-relative archives must exist under `root` and match their pinned sha256."""
    problems: list[SpecProblem] = []
    for name, app in result.valid_apps.items():
        source = app.source
        if not isinstance(source, ArchiveSource) or "://" in source.url:
            continue
        path = result.sources[name][0]
        at = result.field_locations.get((name, "source.url"), (result.sources[name][1], 1))
        target = (root / source.url).resolve()
        if not target.is_relative_to(root.resolve()):
            problems.append(SpecProblem(path, *at, f"{source.url} is outside the repository",
                                        field="source.url"))
            continue
        if not target.is_file():
            problems.append(SpecProblem(path, *at, f"{source.url}: no such file in the "
                                        "repository", field="source.url"))
            continue
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        if digest != source.sha256:
            where = result.field_locations.get((name, "source.sha256"), at)
            problems.append(SpecProblem(
                path, *where, f"does not match {source.url} (its sha256 is {digest})",
                field="source.sha256"))
    return problems


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _problem_json(problem: SpecProblem) -> dict[str, object]:
    return {
        "path": problem.path,
        "line": problem.line,
        "col": problem.col,
        "field": problem.field,
        "message": problem.message,
        "text": str(problem),
    }


def run_schema(args: argparse.Namespace) -> int:
    if getattr(args, "rollout", False):
        print(json.dumps(rollout_json_schema(), indent=2, sort_keys=True))
        return EXIT_OK
    if getattr(args, "events", False):
        print(json.dumps(event_json_schema(), indent=2, sort_keys=True))
        return EXIT_OK
    print(json.dumps(app_json_schema(), indent=2, sort_keys=True))
    return EXIT_OK
