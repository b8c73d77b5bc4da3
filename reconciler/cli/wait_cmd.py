"""`wait`: block until every targeted node reports synced at a revision (for CI after `git
push`), riding out failover; a rollout's progress on stderr, its abort ends the wait."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import nats.errors
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from reconciler.cli.mesh_cmds import FOLLOW_OPTIONS, _err, _now, _observe, _run, _timeout
from reconciler.core.rollout import progress_line
from reconciler.core.spec import Selector
from reconciler.mesh.client import FOLLOW_API_TIMEOUT_S, KvEntry, jetstream
from reconciler.mesh.conn import MeshError, NatsOptions, connect
from reconciler.mesh.rollouts import read_entry, resolve_revision, rollouts_bucket
from reconciler.mesh.statuses import LiveStatuses
from reconciler.mesh.subjects import KV_BUCKET
from reconciler.mesh.wire import selector_from_pairs, wait_targets, wait_verdict

# 0 synced, 1 a node failed (or the rollout aborted), 2 timeout or mesh unreachable.
EXIT_SYNCED, EXIT_NODE_FAILED, EXIT_TIMEOUT = 0, 1, 2


def run_wait(args: argparse.Namespace) -> int:
    return _run(lambda: _wait(args))


async def _wait(args: argparse.Namespace) -> int:
    revision = args.revision.strip()
    timeout = _timeout(args.timeout)
    selector = selector_from_pairs(args.selector or [])
    deadline = time.monotonic() + timeout
    options = NatsOptions.from_args(args)
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    try:
        nc = await connect(options, timeout=max(0.5, min(5.0, timeout)), **FOLLOW_OPTIONS,
                           reconnected_cb=on_reconnect)
    except MeshError as exc:
        _err(str(exc))
        return EXIT_TIMEOUT
    try:
        return await wait_for_revision(nc, revision, selector, list(args.node or []), deadline,
                                       js_domain=options.js_domain, reconnected=reconnected)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def wait_for_revision(
    nc: NATS, revision: str, selector: Selector | None, nodes: list[str], deadline: float,
    *, js_domain: str | None = None, reconnected: asyncio.Event | None = None,
) -> int:
    """Follow the status KV until every targeted node is synced (0) or one failed (1) at
    `revision`; 2 at the deadline. Failover (server death, leader change) is ridden out:
    the follow is re-made whenever it breaks and after every reconnect (`reconnected`: the
    connection's reconnect signal), until the deadline; while there is no follow, the
    statuses are read straight from any replica (LiveStatuses)."""
    statuses = LiveStatuses(nc, js_domain)
    targets: list[str] = []  # of the last view: what a direct read asks for
    rollout = RolloutWatch(nc, revision, js_domain)
    # the rollout entry is read beside the status follow, never in its way: a read sent
    # while a server dies waits out its API timeout, and the follow must be re-made at once
    watching = asyncio.create_task(rollout.run(), name="wait-rollout-watch")
    try:
        while True:
            if rollout.aborted is not None:
                _err(rollout.aborted)
                return EXIT_NODE_FAILED
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if reconnected is not None and reconnected.is_set():
                reconnected.clear()
                await statuses.restart()
            try:
                entries = await statuses.read(nodes or targets or None, left)
            except MeshError as exc:  # no JetStream on this server at all: futile
                _err(str(exc))
                return EXIT_TIMEOUT
            if entries is not None:
                decided = _decide(entries, nodes, selector, revision, targets)
                if decided is not None:
                    return decided
            # no news: re-check at least every second (heartbeats age, the deadline nears)
            await statuses.news(reconnected, rollout.ended,
                                timeout=max(0.05, min(1.0, deadline - time.monotonic())))
    finally:
        # a stop flag as well as the cancel: Python 3.11's wait_for (inside nats-py's request)
        # can lose a cancel that lands as its reply arrives, and the watch would go on; the
        # wait for it is bounded, so `wait` always exits
        rollout.stopping = True
        watching.cancel()
        await asyncio.wait({watching}, timeout=1.0)
        await statuses.close()
    entries = statuses.latest
    if entries is None:
        why = f": {statuses.trouble}" if statuses.trouble else \
            f" (no node has reported to {KV_BUCKET})"
        _err(f"timed out reading {KV_BUCKET}{why}")
        return EXIT_TIMEOUT
    fleet = _observe(entries)
    verdict = wait_verdict(fleet, wait_targets(fleet, nodes, selector), revision, _now())
    return _report_wait(revision, verdict.synced, verdict.failed, verdict.pending, True)


def _decide(entries: dict[str, KvEntry], nodes: list[str], selector: Selector | None,
            revision: str, targets: list[str]) -> int | None:
    """The exit code once every target is synced or one failed (None: keep waiting);
    `targets` is set to this view's targeted nodes."""
    fleet = _observe(entries)
    targets[:] = wait_targets(fleet, nodes, selector)
    if not targets:
        what = selector.describe() if selector else "any node"
        _err(f"no node in {KV_BUCKET} matches {what}")
        return EXIT_NODE_FAILED
    verdict = wait_verdict(fleet, targets, revision, _now())
    if verdict.done:
        return _report_wait(revision, verdict.synced, verdict.failed, verdict.pending, False)
    return None


class RolloutWatch:
    """`wait`'s view of the revision's rollout entry (gitops_rollouts): prints per-wave
    progress to stderr when it changes, and tells when the rollout was aborted (`aborted`,
    and `ended` is set). Read every READ_EVERY_S seconds, so an abort ends a wait within
    about a second."""

    READ_EVERY_S = 0.5

    def __init__(self, nc: NATS, revision: str, js_domain: str | None) -> None:
        self.nc, self.revision, self.js_domain = nc, revision, js_domain
        self._kv: KeyValue | None = None
        self._key: str | None = None
        self._shown = ""
        self.aborted: str | None = None
        self.ended = asyncio.Event()
        self.stopping = False

    async def run(self) -> None:
        """Read the entry until the rollout is aborted (the caller cancels it otherwise)."""
        while self.aborted is None and not self.stopping:
            try:
                self.aborted = await self.check()
            except Exception:  # an unreadable entry: the node statuses still decide the wait
                self.aborted = None
            if self.aborted is not None:
                self.ended.set()
                return
            await asyncio.sleep(self.READ_EVERY_S)

    async def check(self) -> str | None:
        """None, or why the wait must end now (the rollout was aborted)."""
        try:
            if self._kv is None:
                # short API timeouts: a read lost in a failover must not hold `wait` up
                js = jetstream(self.nc, self.js_domain, timeout=FOLLOW_API_TIMEOUT_S)
                self._kv = await rollouts_bucket(js, create=False)
                if self._kv is None:
                    return None
            if self._key is None:
                self._key = await resolve_revision(self._kv, self.revision)
                if self._key is None:
                    return None
            entry, _ = await read_entry(self._kv, self._key)
        except (TimeoutError, nats.errors.Error):
            return None  # the node statuses still decide; try again shortly
        if entry is None:
            return None
        line = progress_line(entry, _now())
        if line != self._shown:
            self._shown = line
            _err(f"rollout {line}")
        if entry.state == "aborted":
            return f"{self._key[:12]}: rollout aborted: {entry.reason}"
        return None


def _report_wait(revision: str, synced: tuple[str, ...], failed: dict[str, str],
                 pending: dict[str, str], timed_out: bool) -> int:
    short = revision[:12]
    if not failed and not pending:
        print(f"{short}: synced on {len(synced)} node(s): {', '.join(synced)}")
        return EXIT_SYNCED
    for node, why in sorted(failed.items()):
        _err(f"{node}: failed at {short}: {why}")
    for node, why in sorted(pending.items()):
        _err(f"{node}: not synced at {short} {'before the timeout' if timed_out else ''}: {why}")
    bad = sorted([*failed, *pending])
    _err(f"{short}: {len(synced)} synced, not synced: {', '.join(bad)}")
    return EXIT_NODE_FAILED if failed else EXIT_TIMEOUT
