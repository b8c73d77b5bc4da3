"""Node RPC verbs over NATS: suspend, resume, health, state, logs (thin shells over `call`).

Exit codes (README, docs/operations.md): 0 done; 1 a node refused or failed the request
(unknown app, an error there), an app is unhealthy (`health`), or some of the selected nodes
failed; 2 usage (bad flags, bad selector); 3 unreachable (NATS, or no node answered, or no
node matches the selector); 4 permission denied by the NATS server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS

from reconciler.cli.mesh_cmds import _err, _timeout, read_fleet
from reconciler.mesh.client import RpcError, call
from reconciler.mesh.conn import MeshError, NatsOptions, connect
from reconciler.mesh.subjects import KV_BUCKET, rpc_subject
from reconciler.mesh.wire import BadRequest, format_table, selector_from_pairs
from reconciler.node.logtail import MAX_LINES

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_DENIED = 4
# kind of failure -> exit code; `kind` is also the "error" of --json answers
EXIT_CODES = {"failed": EXIT_FAILED, "refused": EXIT_FAILED, "usage": EXIT_USAGE,
              "unreachable": EXIT_UNREACHABLE, "denied": EXIT_DENIED}
FOLLOW_POLL_S = 0.5


class Failure(Exception):
    """One failed call, as the user should read it: `kind` picks the exit code."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]


class Caller:
    """One NATS connection for RPC that tells a permission refusal from a silent node.

    The server drops a request it does not allow and says so only in an asynchronous
    -ERR "Permissions Violation": waiting for the reply would end in a plain timeout."""

    def __init__(self) -> None:
        self.nc: NATS | None = None
        self._violations: list[str] = []
        self._violation = asyncio.Event()

    async def __aenter__(self) -> Caller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def connect(self, options: NatsOptions) -> None:
        async def on_error(exc: Exception) -> None:
            if "permissions violation" in str(exc).lower():
                self._violations.append(str(exc).removeprefix("nats: "))
                self._violation.set()

        try:
            self.nc = await connect(options, error_cb=on_error)
        except MeshError as exc:
            raise Failure("unreachable", str(exc)) from None

    def _denied(self, subject: str) -> str | None:
        for text in self._violations:
            if subject in text or "subscription" in text.lower():
                return text
        return None

    async def call(self, node: str, endpoint: str, body: dict[str, Any] | None,
                   timeout: float) -> Any:
        assert self.nc is not None
        subject = rpc_subject(node, endpoint)
        request = asyncio.ensure_future(call(self.nc, node, endpoint, body, timeout))
        while not request.done():
            self._violation.clear()
            refused = asyncio.ensure_future(self._violation.wait())
            await asyncio.wait({request, refused}, return_when=asyncio.FIRST_COMPLETED)
            refused.cancel()
            denied = self._denied(subject)
            if denied and not request.done():
                request.cancel()
                raise Failure("denied", f"permission denied calling {subject}: {denied} "
                              "(this identity may not call that node's RPC: docs/nats.md)")
        try:
            return request.result()
        except RpcError as exc:
            denied = self._denied(subject)
            if denied:
                raise Failure("denied", f"permission denied calling {subject}: "
                              f"{denied}") from None
            if exc.silent:
                raise Failure("unreachable", f"no node answered: {exc}") from None
            raise Failure("refused" if exc.code == "400" else "failed", str(exc)) from None


def _run(args: argparse.Namespace,
         verb: Callable[[Caller, argparse.Namespace], Coroutine[Any, Any, int]]) -> int:
    async def main() -> int:
        async with Caller() as caller:
            await caller.connect(NatsOptions.from_args(args))
            return await verb(caller, args)

    try:
        return asyncio.run(main())
    except Failure as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": exc.kind, "message": str(exc)}))
        _err(str(exc))
        return exc.exit_code


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2), flush=True)


def _usage(message: str) -> Failure:
    return Failure("usage", message)


# ---- suspend / resume ----------------------------------------------------------------------
def run_suspend(args: argparse.Namespace) -> int:
    return _run(args, lambda caller, a: _suspend(caller, a, "suspend"))


def run_resume(args: argparse.Namespace) -> int:
    return _run(args, lambda caller, a: _suspend(caller, a, "resume"))


@dataclass
class NodeResult:
    node: str
    reply: dict[str, Any] | None = None
    failure: Failure | None = None

    def to_json(self) -> dict[str, Any]:
        if self.failure is None:
            return {"ok": True, **(self.reply or {}), "node": self.node}
        return {"node": self.node, "ok": False, "error": self.failure.kind,
                "message": str(self.failure)}


async def _targets(caller: Caller, args: argparse.Namespace) -> list[str]:
    """--node, or every node in the status KV that --selector matches."""
    if args.node:
        return [args.node]
    try:
        selector = selector_from_pairs(args.selector or [])
    except BadRequest as exc:
        raise _usage(f"bad selector: {exc}") from None
    assert caller.nc is not None and selector is not None
    fleet = await read_fleet(caller.nc, js_domain=NatsOptions.from_args(args).js_domain)
    nodes = sorted(n for n, obs in fleet.items() if selector.matches(obs.status.labels))
    if not nodes:
        raise Failure("unreachable", f"no node in {KV_BUCKET} matches {selector.describe()}")
    return nodes


async def _suspend(caller: Caller, args: argparse.Namespace, verb: str) -> int:
    timeout = _rpc_timeout(args)
    nodes = await _targets(caller, args)
    body = {"app": args.app} if args.app else None

    async def one(node: str) -> NodeResult:
        try:
            return NodeResult(node, reply=await caller.call(node, verb, body, timeout))
        except Failure as exc:
            return NodeResult(node, failure=exc)

    results = await asyncio.gather(*(one(node) for node in nodes))
    done = "suspended" if verb == "suspend" else "resumed"
    if args.json:
        _print_json([r.to_json() for r in results])
    for result in results:
        if result.failure is not None:
            _err(f"{result.node}: {result.failure}")
        elif not args.json:
            print(f"{result.node}  {args.app + ' ' if args.app else ''}{done}")
    failures = [r.failure for r in results if r.failure is not None]
    if not failures:
        return EXIT_OK
    kinds = {f.kind for f in failures}
    # every node failed the same way: say how; a mixed outcome is a plain failure
    return failures[0].exit_code if len(failures) == len(results) and len(kinds) == 1 \
        else EXIT_FAILED


def _rpc_timeout(args: argparse.Namespace) -> float:
    try:
        return _timeout(args.timeout)
    except BadRequest as exc:
        raise _usage(str(exc)) from None


# ---- health ----------------------------------------------------------------------------------
def run_health(args: argparse.Namespace) -> int:
    return _run(args, _health)


async def _health(caller: Caller, args: argparse.Namespace) -> int:
    body = {"app": args.app} if args.app else None
    reply = await caller.call(args.node, "health", body, _rpc_timeout(args))
    health: dict[str, str] = reply.get("health", {})
    if args.json:
        _print_json(reply)
    elif not health:
        print(f"{args.node}: no apps")
    else:
        rows = [{"app": app, "health": value} for app, value in sorted(health.items())]
        print(format_table(rows, ["app", "health"]))
    return EXIT_FAILED if "unhealthy" in health.values() else EXIT_OK


# ---- state -----------------------------------------------------------------------------------
def run_state(args: argparse.Namespace) -> int:
    return _run(args, _state)


async def _state(caller: Caller, args: argparse.Namespace) -> int:
    state = await caller.call(args.node, "state", None, _rpc_timeout(args))
    if args.json:
        _print_json(state)
        return EXIT_OK
    print(format_state(state))
    return EXIT_OK


def format_state(state: dict[str, Any]) -> str:
    """Desired against current, one row per app (the whole answer is in --json)."""
    desired = state.get("desired") or {}
    wanted: dict[str, Any] = desired.get("apps") or {}
    current: dict[str, Any] = state.get("current") or {}
    lines = [f"node {state.get('node', '?')}  desired revision "
             f"{(desired.get('revision') or '-')[:12]}"]
    rows = []
    for name in sorted(set(wanted) | set(current)):
        have = current.get(name) or {}
        rows.append({
            "app": name, "running": have.get("version") or "-",
            "desired": (wanted.get(name) or {}).get("version") or "-",
            "phase": have.get("phase") or "-", "health": have.get("health") or "-",
            "suspended": "yes" if have.get("suspended") else "",
        })
    if rows:
        columns = ["app", "running", "desired", "phase", "health", "suspended"]
        lines.append(format_table(rows, columns))
    else:
        lines.append("(no apps)")
    lines += [f"invalid spec: {name}" for name in desired.get("invalid") or []]
    lines += [f"problem: {problem}" for problem in desired.get("problems") or []]
    return "\n".join(lines)


# ---- logs ------------------------------------------------------------------------------------
def run_logs(args: argparse.Namespace) -> int:
    return _run(args, _logs)


async def _logs(caller: Caller, args: argparse.Namespace) -> int:
    if not 1 <= args.lines <= MAX_LINES:
        raise _usage(f"--lines: between 1 and {MAX_LINES} (a node answers at most that many)")
    timeout = _rpc_timeout(args)
    body: dict[str, Any] = {"app": args.app, "lines": args.lines}
    chunk = await caller.call(args.node, "logs", body, timeout)
    _print_chunk(chunk, args.json)
    if not args.follow:
        return EXIT_OK
    trouble: str | None = None
    while True:  # until Ctrl-C (main turns KeyboardInterrupt into exit 130)
        if not chunk.get("more"):
            await asyncio.sleep(FOLLOW_POLL_S)
        body = {"app": args.app, "lines": MAX_LINES, "cursor": chunk["cursor"]}
        try:
            chunk = await caller.call(args.node, "logs", body, timeout)
        except Failure as exc:
            if exc.kind != "unreachable":
                raise
            if trouble is None:  # an agent restart: keep the cursor and try again
                _err(f"{exc} (still following)")
            trouble = str(exc)
            continue
        trouble = None
        _print_chunk(chunk, args.json)


def _print_chunk(chunk: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(chunk), flush=True)  # one answer per line while following
        return
    lines = chunk.get("lines") or []
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
