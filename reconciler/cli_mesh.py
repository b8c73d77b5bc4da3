"""Fleet commands over NATS: status, reconcile, wait, notify, nats-config (thin I/O shells)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from reconciler.bus_conn import MeshError, NatsOptions, connect, no_jetstream
from reconciler.subjects import FLEET_RECONCILE, KV_BUCKET, SOURCE_CHANGED, rpc_subject

# `notify` runs in a git hook on every push: it must not pay for pydantic models, so the
# status/selector modules are imported only by the commands that use them.
if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from reconciler.bus_wire import Observed
    from reconciler.spec import Selector

RPC_TIMEOUT_S = 5.0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _err(message: str) -> None:
    print(f"gitops-mesh: {message}", file=sys.stderr)


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        return asyncio.run(main())
    except MeshError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ValueError as exc:
        from reconciler.bus_wire import BadRequest

        if not isinstance(exc, BadRequest):
            raise
        _err(str(exc))
        return EXIT_USAGE


def _timeout(text: str) -> float:
    from reconciler.bus_wire import BadRequest
    from reconciler.spec import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise BadRequest(f"--timeout: {exc}") from None


def _now() -> datetime:
    return datetime.now(UTC)


def _entry_time(entry: KeyValue.Entry) -> datetime | None:
    created: Any = entry.created
    return created if isinstance(created, datetime) else None


async def _bucket(nc: NATS, js_domain: str | None = None) -> KeyValue | None:
    js = nc.jetstream(domain=js_domain) if js_domain else nc.jetstream()
    try:
        return await js.key_value(KV_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return None
    except nats.js.errors.ServiceUnavailableError:
        raise MeshError(no_jetstream(js_domain)) from None


async def read_fleet(nc: NATS, *, js_domain: str | None = None) -> dict[str, Observed]:
    """Every node's latest KV status (with the server's write time); `js_domain`: the
    bucket's JetStream domain when `nc` is connected to a leaf node server."""
    kv = await _bucket(nc, js_domain)
    if kv is None:
        return {}
    fleet: dict[str, Observed] = {}
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        while True:
            entry = await watcher.updates(timeout=RPC_TIMEOUT_S)
            if entry is None:
                return fleet
            _apply(fleet, entry)
    finally:
        # The server may have gone away meanwhile: what was read still stands.
        with contextlib.suppress(nats.errors.ConnectionClosedError):
            await watcher.stop()


def _apply(fleet: dict[str, Observed], entry: KeyValue.Entry) -> None:
    from reconciler.bus_wire import Observed
    from reconciler.status import NodeStatus

    if entry.operation in ("DEL", "PURGE") or not entry.value:
        fleet.pop(entry.key, None)
        return
    try:
        status = NodeStatus.from_json(entry.value)
    except ValueError:
        _err(f"ignoring unreadable status of {entry.key!r} in {KV_BUCKET}")
        return
    fleet[entry.key] = Observed(status, _entry_time(entry))


async def rpc(nc: NATS, node: str, endpoint: str, body: dict[str, Any] | None = None,
              timeout: float = RPC_TIMEOUT_S) -> Any:
    """Call one node's endpoint; service errors and silence become MeshError."""
    data = json.dumps(body).encode() if body else b""
    try:
        msg = await nc.request(rpc_subject(node, endpoint), data, timeout=timeout)
    except nats.errors.NoRespondersError:
        raise MeshError(f"node {node!r} is not answering (no responders)") from None
    except nats.errors.TimeoutError:
        raise MeshError(f"node {node!r} did not answer within {timeout:g}s") from None
    headers = msg.headers or {}
    if "Nats-Service-Error-Code" in headers:
        raise MeshError(
            f"node {node!r} {endpoint}: error {headers['Nats-Service-Error-Code']}: "
            f"{headers.get('Nats-Service-Error', '')}"
        )
    return json.loads(msg.data)


# ---- status ------------------------------------------------------------------------------
def run_status(args: argparse.Namespace) -> int:
    return _run(lambda: _status(args))


async def _status(args: argparse.Namespace) -> int:
    from reconciler.bus_wire import fleet_rows, format_table, observed_state

    options = NatsOptions.from_args(args)
    nc = await connect(options)
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
    from reconciler.bus_wire import observed_state
    from reconciler.status import NodeStatus

    written_at = None
    try:
        status = NodeStatus.from_json(await rpc(nc, node, "status", timeout=3.0))
    except MeshError as rpc_error:
        try:
            kv = await _bucket(nc, js_domain)
        except MeshError as kv_error:
            _err(f"{rpc_error}, and its status cannot be read: {kv_error}")
            return EXIT_FAILED
        entry = None
        if kv is not None:
            try:
                entry = await kv.get(node)
            except nats.js.errors.KeyNotFoundError:
                entry = None
        if entry is None or not entry.value:
            _err(f"{rpc_error}, and it has no status in {KV_BUCKET}")
            return EXIT_FAILED
        status = NodeStatus.from_json(entry.value)
        written_at = _entry_time(entry)
    state = observed_state(status, _now(), written_at)
    if as_json:
        data = status.model_dump(mode="json")
        data["status"] = state
        print(json.dumps(data, indent=2))
        return 0
    from reconciler.cli_node import format_status

    print(format_status(status.model_copy(update={"status": state})))
    return 0


# ---- reconcile -----------------------------------------------------------------------------
def run_reconcile(args: argparse.Namespace) -> int:
    return _run(lambda: _reconcile(args))


async def _reconcile(args: argparse.Namespace) -> int:
    from reconciler.bus_wire import selector_from_pairs

    timeout = _timeout(args.timeout)
    selector = selector_from_pairs(args.selector or [])
    options = NatsOptions.from_args(args)
    nc = await connect(options)
    try:
        if args.node:
            try:
                reply = await rpc(nc, args.node, "reconcile", {"reason": "cli"},
                                  timeout=timeout)
            except MeshError as exc:  # NATS is fine, the node is not: a failure, not usage
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
            print(f"{reply['node']}  {reply['run_id']}")
    if not replies:
        _err("no node answered" + (f" (selector: {selector.describe()})" if selector else ""))
        return EXIT_FAILED
    return 0


async def fleet_reconcile(
    nc: NATS, selector: Selector | None, timeout: float, *, js_domain: str | None = None
) -> list[dict[str, Any]]:
    """Trigger every matching node; collect replies until the reachable matching nodes known
    from the KV have all answered, or `timeout`."""
    from reconciler.bus_wire import is_unreachable

    now = _now()
    expected = {
        node for node, obs in (await read_fleet(nc, js_domain=js_domain)).items()
        if (selector is None or selector.matches(obs.status.labels))
        and not is_unreachable(obs.status, now, obs.written_at)
    }
    replies: dict[str, dict[str, Any]] = {}
    complete = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        try:
            reply = json.loads(msg.data)
            replies[str(reply["node"])] = reply
        except (ValueError, KeyError, TypeError):
            return
        if expected and expected <= set(replies):
            complete.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    body = {"selector": selector.model_dump(by_alias=True)} if selector else {}
    await nc.publish(FLEET_RECONCILE, json.dumps(body).encode(), reply=inbox)
    await nc.flush()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(complete.wait(), timeout)
    await sub.unsubscribe()
    return [replies[n] for n in sorted(replies)]


# ---- wait ----------------------------------------------------------------------------------
def run_wait(args: argparse.Namespace) -> int:
    return _run(lambda: _wait(args))


async def _wait(args: argparse.Namespace) -> int:
    from reconciler.bus_wire import selector_from_pairs

    revision = args.revision.strip()
    timeout = _timeout(args.timeout)
    selector = selector_from_pairs(args.selector or [])
    deadline = time.monotonic() + timeout
    options = NatsOptions.from_args(args)
    nc = await connect(options)
    try:
        return await wait_for_revision(nc, revision, selector, list(args.node or []), deadline,
                                       js_domain=options.js_domain)
    finally:
        await nc.close()


async def wait_for_revision(
    nc: NATS, revision: str, selector: Selector | None, nodes: list[str], deadline: float,
    *, js_domain: str | None = None,
) -> int:
    """Watch the status KV until every targeted node is synced (or failed) at `revision`."""
    from reconciler.bus_wire import wait_targets, wait_verdict

    kv = await _bucket(nc, js_domain)
    while kv is None:
        if time.monotonic() > deadline:
            _err(f"timed out: no node has reported to {KV_BUCKET}")
            return EXIT_FAILED
        await asyncio.sleep(0.5)
        kv = await _bucket(nc, js_domain)
    fleet: dict[str, Observed] = {}
    watcher = await kv.watchall()
    initial = True
    try:
        while True:
            remaining = deadline - time.monotonic()
            try:
                entry = await watcher.updates(timeout=max(0.05, min(1.0, remaining)))
            except nats.errors.TimeoutError:
                entry = False  # no news: re-check (heartbeats age, the deadline nears)
            if entry is None:
                initial = False
            elif entry is not False:
                _apply(fleet, entry)
            if initial:
                if time.monotonic() >= deadline:
                    _err(f"timed out reading {KV_BUCKET}")
                    return EXIT_FAILED
                continue
            targets = wait_targets(fleet, nodes, selector)
            if not targets:
                what = selector.describe() if selector else "any node"
                _err(f"no node in {KV_BUCKET} matches {what}")
                return EXIT_FAILED
            verdict = wait_verdict(fleet, targets, revision, _now())
            timed_out = time.monotonic() >= deadline
            if verdict.done or timed_out:
                return _report_wait(revision, verdict.synced, verdict.failed,
                                    verdict.pending, timed_out)
    finally:
        # The server may have gone away meanwhile: what was read still stands.
        with contextlib.suppress(nats.errors.ConnectionClosedError):
            await watcher.stop()


def _report_wait(revision: str, synced: tuple[str, ...], failed: dict[str, str],
                 pending: dict[str, str], timed_out: bool) -> int:
    short = revision[:12]
    if not failed and not pending:
        print(f"{short}: synced on {len(synced)} node(s): {', '.join(synced)}")
        return 0
    for node, why in sorted(failed.items()):
        _err(f"{node}: failed at {short}: {why}")
    for node, why in sorted(pending.items()):
        _err(f"{node}: not synced at {short} {'before the timeout' if timed_out else ''}: {why}")
    bad = sorted([*failed, *pending])
    _err(f"{short}: {len(synced)} synced, not synced: {', '.join(bad)}")
    return EXIT_FAILED


# ---- notify --------------------------------------------------------------------------------
def run_notify(args: argparse.Namespace) -> int:
    return _run(lambda: _notify(args))


async def _notify(args: argparse.Namespace) -> int:
    # the body of bus_wire.SourceChanged, built here without importing it (see the imports)
    body = {"repo": args.repo, "branch": args.branch.removeprefix("refs/heads/"),
            "revision": args.revision}
    nc = await connect(NatsOptions.from_args(args), timeout=3.0)
    try:
        await nc.publish(SOURCE_CHANGED, json.dumps(body).encode())
        await nc.flush(timeout=3)
    finally:
        await nc.close()
    return 0


# ---- nats-config ---------------------------------------------------------------------------
def run_nats_config(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reconciler.natsconfig import NatsConfigError, write_config

    try:
        written = write_config(Path(args.out), list(args.node or []), auth=args.auth)
    except NatsConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    for path in written:
        print(path)
    return 0
