"""Fleet commands over NATS: status, reconcile, wait, nats-config (thin I/O shells)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from reconciler.cli.render import format_status
from reconciler.core.rollout import progress_line
from reconciler.core.spec import Selector, parse_duration
from reconciler.core.status import NodeStatus
from reconciler.mesh.client import (
    FOLLOW_API_TIMEOUT_S,
    TRANSIENT,
    KvFollower,
    RpcError,
    call,
    get_entry,
    jetstream,
    open_bucket,
    reply_of,
    retrying,
    scatter,
)
from reconciler.mesh.conn import MeshError, NatsOptions, connect, no_jetstream, reason_of
from reconciler.mesh.permissions import NatsConfigError, write_config
from reconciler.mesh.rollouts import read_entry, resolve_revision, rollouts_bucket
from reconciler.mesh.subjects import FLEET_RECONCILE, KV_BUCKET
from reconciler.mesh.wire import (
    BadRequest,
    Observed,
    fleet_rows,
    format_table,
    is_unreachable,
    observed_state,
    selector_from_pairs,
    wait_targets,
    wait_verdict,
)

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from reconciler.mesh.client import KvEntry

RPC_TIMEOUT_S = 5.0
EXIT_FAILED = 1
EXIT_USAGE = 2
# `wait`: 0 synced, 1 a node failed (or the rollout aborted), 2 timeout or mesh unreachable.
EXIT_SYNCED, EXIT_NODE_FAILED, EXIT_TIMEOUT = 0, 1, 2
# A dead server is noticed fast and another one of the --nats list taken at once.
FOLLOW_OPTIONS: dict[str, Any] = {
    "allow_reconnect": True, "max_reconnect_attempts": -1, "reconnect_time_wait": 0.1,
    "ping_interval": 1, "max_outstanding_pings": 2,
}


def _err(message: str) -> None:
    print(f"gitops-mesh: {message}", file=sys.stderr)


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command; NATS trouble ends it with a message and exit 2, never a traceback."""
    try:
        return asyncio.run(main())
    except MeshError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except (*TRANSIENT, nats.errors.Error) as exc:
        _err(f"NATS: {reason_of(exc)}")
        return EXIT_USAGE
    except BadRequest as exc:
        _err(str(exc))
        return EXIT_USAGE


def _timeout(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise BadRequest(f"--timeout: {exc}") from None


def _now() -> datetime:
    return datetime.now(UTC)


def _observe(entries: dict[str, KvEntry]) -> dict[str, Observed]:
    """Statuses of the followed KV entries (deleted and unreadable ones left out)."""
    fleet: dict[str, Observed] = {}
    for key, entry in entries.items():
        if not entry.value:
            continue
        try:
            fleet[key] = Observed(NodeStatus.from_json(entry.value), entry.created)
        except ValueError:
            _err(f"ignoring unreadable status of {key!r} in {KV_BUCKET}")
    return fleet


async def read_fleet(nc: NATS, *, js_domain: str | None = None,
                     timeout: float = RPC_TIMEOUT_S) -> dict[str, Observed]:
    """Every node's latest KV status (with the server's write time); `js_domain`: the
    bucket's JetStream domain when `nc` is connected to a leaf node server. Retried through
    a failover within `timeout`."""

    async def once() -> dict[str, Observed]:
        if await open_bucket(nc, KV_BUCKET, js_domain, FOLLOW_API_TIMEOUT_S) is None:
            return {}
        follower = KvFollower(nc, KV_BUCKET, js_domain)
        try:
            await follower.start()
            await asyncio.wait_for(follower.caught_up.wait(), timeout)
            return _observe(follower.entries)
        finally:
            await follower.stop()

    return await retrying(once, timeout, f"reading {KV_BUCKET}")


# ---- status ------------------------------------------------------------------------------
def run_status(args: argparse.Namespace) -> int:
    return _run(lambda: _status(args))


async def _status(args: argparse.Namespace) -> int:
    options = NatsOptions.from_args(args)
    nc = await connect(options, **FOLLOW_OPTIONS)
    try:
        if args.node:
            return await _node_status(nc, args.node, args.json, options.js_domain)
        fleet = await read_fleet(nc, js_domain=options.js_domain)
    finally:
        await nc.close()
    now = _now()
    if args.json:
        out = []
        for node in sorted(fleet):
            data = fleet[node].status.model_dump(mode="json")
            data["status"] = observed_state(fleet[node].status, now, fleet[node].written_at)
            out.append(data)
        print(json.dumps(out, indent=2))
        return 0
    if not fleet:
        print(f"no node has reported to {KV_BUCKET} yet")
        return 0
    columns = ["node", "status", "revision", "apps", "labels", "age_s", "message"]
    print(format_table(fleet_rows(fleet, now), columns))
    return 0


async def _node_status(nc: NATS, node: str, as_json: bool, js_domain: str | None) -> int:
    written_at = None
    try:
        answer = reply_of(node, "status", await call(nc, node, "status", timeout=3.0))
        try:
            status = NodeStatus.from_json(answer)
        except ValueError:
            raise RpcError(f"node {node!r} status: the answer is not a node status", 502) \
                from None
    except RpcError as rpc_error:
        try:
            kv = await open_bucket(nc, KV_BUCKET, js_domain)
            entry = await get_entry(kv, node) if kv is not None else None
        except (MeshError, *TRANSIENT) as kv_error:
            _err(f"{rpc_error}, and its status cannot be read: {reason_of(kv_error)}")
            return EXIT_FAILED
        if entry is None or not entry.value:
            _err(f"{rpc_error}, and it has no status in {KV_BUCKET}")
            return EXIT_FAILED
        try:
            status = NodeStatus.from_json(entry.value)
        except ValueError:
            _err(f"{rpc_error}, and its status in {KV_BUCKET} is unreadable")
            return EXIT_FAILED
        created: Any = entry.created
        written_at = created if isinstance(created, datetime) else None
    state = observed_state(status, _now(), written_at)
    if as_json:
        data = status.model_dump(mode="json")
        data["status"] = state
        print(json.dumps(data, indent=2))
        return 0
    print(format_status(status.model_copy(update={"status": state})))
    return 0


# ---- reconcile -----------------------------------------------------------------------------
def run_reconcile(args: argparse.Namespace) -> int:
    return _run(lambda: _reconcile(args))


async def _reconcile(args: argparse.Namespace) -> int:
    timeout = _timeout(args.timeout)
    selector = selector_from_pairs(args.selector or [])
    options = NatsOptions.from_args(args)
    nc = await connect(options, **FOLLOW_OPTIONS)
    try:
        if args.node:
            try:
                reply = reply_of(args.node, "reconcile", await call(
                    nc, args.node, "reconcile", {"reason": "cli"}, timeout=timeout))
            except RpcError as exc:  # NATS is fine, the node is not: a failure, not usage
                _err(str(exc))
                return EXIT_FAILED
            replies = [reply]
        else:
            replies = await fleet_reconcile(nc, selector, timeout, js_domain=options.js_domain)
    finally:
        await nc.close()
    if args.json:
        print(json.dumps(replies, indent=2))
    else:
        for reply in replies:
            print(f"{reply['node']}  {reply.get('run_id', '')}")
    if not replies:
        _err("no node answered" + (f" (selector: {selector.describe()})" if selector else ""))
        return EXIT_FAILED
    return 0


async def fleet_reconcile(
    nc: NATS, selector: Selector | None, timeout: float, *, js_domain: str | None = None
) -> list[dict[str, Any]]:
    """Trigger every matching node; collect replies until the reachable matching nodes known
    from the KV have all answered, or `timeout`."""
    now = _now()
    expected = {
        node for node, obs in (await read_fleet(nc, js_domain=js_domain)).items()
        if (selector is None or selector.matches(obs.status.labels))
        and not is_unreachable(obs.status, now, obs.written_at)
    }
    body = {"selector": selector.model_dump(by_alias=True)} if selector else {}
    return await scatter(nc, FLEET_RECONCILE, body, timeout, expected)


# ---- wait ----------------------------------------------------------------------------------
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
    connection's reconnect signal), until the deadline."""
    trouble: str | None = None
    follower: KvFollower | None = None
    rollout = RolloutWatch(nc, revision, js_domain)
    try:
        while True:
            aborted = await rollout.check()
            if aborted is not None:
                _err(aborted)
                return EXIT_NODE_FAILED
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if reconnected is not None and reconnected.is_set():
                # our server died: a fresh consumer now beats waiting for nats-py to notice
                # the old one is gone; the latest value of every key comes again
                reconnected.clear()
                if follower is not None:
                    await follower.stop()
                    follower = None
            if follower is None:
                try:
                    follower = await _follow(nc, js_domain, left)
                except MeshError as exc:
                    if no_jetstream_here_message(exc, js_domain):
                        _err(str(exc))
                        return EXIT_TIMEOUT
                    trouble = str(exc)
                    follower = None
                except (*TRANSIENT, nats.errors.Error, nats.js.errors.NotFoundError) as exc:
                    trouble = reason_of(exc)
                    follower = None
                if follower is None:
                    await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
                    continue
                trouble = None
            follower.changed.clear()
            if follower.caught_up.is_set():
                fleet = _observe(follower.entries)
                targets = wait_targets(fleet, nodes, selector)
                if not targets:
                    what = selector.describe() if selector else "any node"
                    _err(f"no node in {KV_BUCKET} matches {what}")
                    return EXIT_NODE_FAILED
                verdict = wait_verdict(fleet, targets, revision, _now())
                if verdict.done:
                    return _report_wait(revision, verdict.synced, verdict.failed,
                                        verdict.pending, False)
            # no news: re-check at least every second (heartbeats age, the deadline nears)
            await _first(follower.changed, reconnected,
                         timeout=max(0.05, min(1.0, deadline - time.monotonic())))
    finally:
        if follower is not None:
            await follower.stop()
    if follower is None or not follower.caught_up.is_set():
        why = f": {trouble}" if trouble else f" (no node has reported to {KV_BUCKET})"
        _err(f"timed out reading {KV_BUCKET}{why}")
        return EXIT_TIMEOUT
    fleet = _observe(follower.entries)
    verdict = wait_verdict(fleet, wait_targets(fleet, nodes, selector), revision, _now())
    return _report_wait(revision, verdict.synced, verdict.failed, verdict.pending, True)


async def _first(*events: asyncio.Event | None, timeout: float) -> None:
    """Until one of `events` is set, or `timeout`."""
    waits = [asyncio.ensure_future(e.wait()) for e in events if e is not None]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def no_jetstream_here_message(exc: MeshError, js_domain: str | None) -> bool:
    """The server has no JetStream at all (a leaf without --nats-js-domain): waiting is futile."""
    return str(exc) == no_jetstream(js_domain)


async def _follow(nc: NATS, js_domain: str | None, timeout: float) -> KvFollower | None:
    """A follower of the status bucket, None while the bucket does not exist yet."""
    if await open_bucket(nc, KV_BUCKET, js_domain, FOLLOW_API_TIMEOUT_S) is None:
        return None
    follower = KvFollower(nc, KV_BUCKET, js_domain)
    try:
        await asyncio.wait_for(follower.start(), timeout)
    except BaseException:
        await follower.stop()
        raise
    return follower


class RolloutWatch:
    """`wait`'s view of the revision's rollout entry (gitops_rollouts): prints per-wave
    progress to stderr when it changes, and tells when the rollout was aborted. Read at most
    every READ_EVERY_S seconds, so an abort ends a wait within about a second."""

    READ_EVERY_S = 0.5

    def __init__(self, nc: NATS, revision: str, js_domain: str | None) -> None:
        self.nc, self.revision, self.js_domain = nc, revision, js_domain
        self._kv: KeyValue | None = None
        self._key: str | None = None
        self._next = 0.0
        self._shown = ""

    async def check(self) -> str | None:
        """None, or why the wait must end now (the rollout was aborted)."""
        if time.monotonic() < self._next:
            return None
        self._next = time.monotonic() + self.READ_EVERY_S
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


# ---- nats-config ---------------------------------------------------------------------------
def run_nats_config(args: argparse.Namespace) -> int:
    try:
        written = write_config(Path(args.out), list(args.node or []), auth=args.auth)
    except NatsConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    for path in written:
        print(path)
    return 0
