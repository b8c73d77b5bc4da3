"""Fleet rollouts from the command line: `rollout status|pause|resume|abort|promote`, and
`plan --nats` (the plan, and whether the node's wave of the revision's rollout is open)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import nats.js.errors

from reconciler.cli import plan_cmds
from reconciler.cli.mesh_cmds import EXIT_FAILED, _err, _now, _run
from reconciler.core.rollout import RolloutRefused, bake_left, wave_rows
from reconciler.mesh.conn import MeshError, NatsOptions, connect, no_jetstream
from reconciler.mesh.rollouts import operate_rollout, read_entry, resolve_revision, rollouts_bucket
from reconciler.mesh.subjects import ROLLOUTS_BUCKET
from reconciler.mesh.wire import format_table


def run_plan(args: argparse.Namespace) -> int:
    """`plan --nats`: plan_cmds.run_plan, with the rollout state read from gitops_rollouts."""
    return plan_cmds.run_plan(args, read_rollout_state=rollout_open)


def run_rollout(args: argparse.Namespace) -> int:
    return _run(lambda: _rollout(args))


async def _rollout(args: argparse.Namespace) -> int:
    options = NatsOptions.from_args(args)
    nc = await connect(options)
    try:
        js = options.jetstream(nc)
        try:
            kv = await rollouts_bucket(js, create=False)
        except nats.js.errors.ServiceUnavailableError:
            raise MeshError(no_jetstream(options.js_domain)) from None
        key = await resolve_revision(kv, args.revision) if kv is not None else None
        entry = (await read_entry(kv, key))[0] if kv is not None and key else None
        if kv is None or key is None or entry is None:
            _err(f"no rollout of {args.revision} in {ROLLOUTS_BUCKET} (a revision without "
                 "rollout.yaml applies everywhere at once)")
            return EXIT_FAILED
        if args.action != "status":
            try:
                result = await operate_rollout(js, kv, options, key, args.action,
                                               args.reason, actor="console")
            except RolloutRefused as exc:
                _err(str(exc))
                return EXIT_FAILED
            assert result.entry is not None
            entry = result.entry
            for event in result.events:
                _err(f"{event.type}: {event.message}")
    finally:
        await nc.close()
    print(json.dumps(_rollout_json(entry), indent=2) if args.json else format_rollout(entry))
    return 0


def rollout_open(args: argparse.Namespace, revision: str, spec: Any,
                 labels: dict[str, str]) -> tuple[bool | None, str | None]:
    """For `plan --nats`: (is the node's wave open, the rollout's state) from the entry."""
    async def read() -> tuple[bool | None, str | None]:
        options = NatsOptions.from_args(args)
        nc = await connect(options)
        try:
            kv = await rollouts_bucket(options.jetstream(nc), create=False)
            entry = (await read_entry(kv, revision))[0] if kv is not None else None
        finally:
            await nc.close()
        if entry is None:
            return spec.wave_of(labels) == 0, None
        index = entry.wave_of(labels)
        is_open = entry.state == "complete" or (
            entry.state == "progressing" and index <= entry.wave_index)
        return is_open, entry.state

    return asyncio.run(read())


def _rollout_json(entry: Any) -> dict[str, Any]:
    now = _now()
    return {**entry.model_dump(mode="json"), "bake_left_s": bake_left(entry, now),
            "progress": wave_rows(entry, now)}


def format_rollout(entry: Any) -> str:
    """A human view of one rollout entry: state, then one row per wave."""
    now = _now()
    head = f"rollout {entry.revision[:12]}  {entry.state.upper()}"
    if entry.wave:
        head += f"  (wave {entry.wave} open)"
    lines = [head + (f"  base {entry.base[:12]}" if entry.base else "")]
    if entry.reason:
        lines.append(f"  reason: {entry.reason}")
    rows = []
    for row in wave_rows(entry, now):
        bake = "-" if row["bake_left_s"] is None else f"{row['bake_left_s']:.0f}s left"
        rows.append({**row, "bake": bake})
    columns = ["name", "phase", "nodes", "synced", "failed", "offline", "applying",
               "max_unavailable", "bake"]
    lines.append(format_table(rows, columns))
    for node, why in sorted(entry.failures.items()):
        lines.append(f"  {node}: {why}")
    return "\n".join(lines)
