"""Fleet commands over NATS: status and reconcile (thin I/O shells), and the helpers every NATS
command shares (`wait` is wait_cmd, the rollouts rollout_cmds, the node RPCs rpc_cmds)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from reconciler.cli.render import format_status
from reconciler.core.spec import Selector, parse_duration
from reconciler.core.status import NodeStatus
from reconciler.mesh.client import (
    TRANSIENT,
    RpcError,
    call,
    get_entry,
    open_bucket,
    reply_of,
    retrying,
    scatter,
)
from reconciler.mesh.conn import MeshError, NatsOptions, connect, reason_of
from reconciler.mesh.direct import direct_last_values
from reconciler.mesh.statuses import follow_statuses
from reconciler.mesh.subjects import FLEET_RECONCILE, KV_BUCKET
from reconciler.mesh.wire import (
    BadRequest,
    Observed,
    fleet_rows,
    format_table,
    is_unreachable,
    observed_state,
    selector_from_pairs,
)

if TYPE_CHECKING:

    from reconciler.mesh.client import KvEntry

RPC_TIMEOUT_S = 5.0
EXIT_FAILED = 1
EXIT_USAGE = 2
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
        # any replica answers a direct read (no leader needed, no consumer to make); a
        # bucket that allows none, or too big a fleet for one, is followed instead
        direct = await direct_last_values(nc, KV_BUCKET, None, js_domain)
        if direct:
            return _observe(direct)
        follower = await follow_statuses(nc, js_domain, timeout)
        if follower is None:
            return {}
        try:
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
