"""`node` (run the agent) and local `status --state-dir` commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import logging
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from reconciler.cli.logs import setup_logging
from reconciler.cli.main import parse_args
from reconciler.cli.status_cmd import local_status, run_status
from reconciler.core.errors import ReconcileError
from reconciler.core.redact import redact_server
from reconciler.core.spec import NAME_RE, parse_duration
from reconciler.core.status import NodeStatus
from reconciler.core.targeting import parse_labels
from reconciler.node.agent import Agent, AgentConfig, StateDirBusy
from reconciler.node.store import StoreError

__all__ = ["local_status", "run_node", "run_status"]

log = logging.getLogger(__name__)


class UsageError(Exception):
    """A bad option value: printed as one line, exit code 2."""


def _duration(args: argparse.Namespace, name: str) -> float:
    value = getattr(args, name)
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"--{name.replace('_', '-')}: {exc}") from None


def _labels(pairs: list[str]) -> dict[str, str]:
    try:
        return parse_labels(pairs)
    except ValueError as exc:
        raise UsageError(f"--label: {exc}") from None


def _existing_file(value: str | None, flag: str) -> Path | None:
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"{flag}: {value}: no such file")
    return path


def agent_config(args: argparse.Namespace) -> AgentConfig:
    if not NAME_RE.match(args.node_id):
        raise UsageError(f"--node-id: {args.node_id!r} is not a valid node id "
                         "(lowercase letters, digits and '-', at most 63)")
    interval = _duration(args, "interval")
    if interval <= 0:
        raise UsageError("--interval: must be more than 0")
    return AgentConfig(
        node_id=args.node_id, repo_url=args.repo, state_dir=Path(args.state_dir),
        labels=_labels(args.label), branch=args.branch, apps_path=args.path,
        interval=interval, heartbeat=_duration(args, "heartbeat"),
        fetch_timeout=_duration(args, "fetch_timeout"), port_offset=args.port_offset,
        outbox_max=args.outbox_max,
        allowed_signers=_existing_file(args.allowed_signers, "--allowed-signers"),
        gpg_keyring=_existing_file(args.gpg_keyring, "--gpg-keyring"),
        allow_rewind=bool(getattr(args, "allow_rewind", False)),
    )


def run_node(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM/SIGINT; with --once one reconcile, exit 0 when synced."""
    try:
        config = agent_config(args)
    except UsageError as exc:
        print(f"gitops-mesh node: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_node(args, config))


async def _node(args: argparse.Namespace, config: AgentConfig) -> int:
    try:
        agent = Agent(config)
    except (StoreError, StateDirBusy, ReconcileError, ValueError, OSError) as exc:
        print(f"gitops-mesh node: {exc}", file=sys.stderr)
        return 1
    node = RunningNode(agent, args, config)
    await node.start_mesh()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, node.reload_soon)
    code = 0
    try:
        if args.once:
            await agent.start(first_reconcile=False, schedule=False)
            run = asyncio.ensure_future(agent.reconcile_now("once"))
            waiter = asyncio.ensure_future(stop.wait())
            await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not run.done():
                run.cancel()
                code = 130
            else:
                status = agent.status()
                code = 0 if status.status == "synced" else 1
                print_problems(status, sys.stdout if code == 0 else sys.stderr)
        else:
            await agent.start()
            await stop.wait()
            log.info("stopping (apps %s)", "stopped" if args.stop_apps_on_exit else "left running")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await node.close_mesh()
        await agent.close(stop_apps=args.stop_apps_on_exit)
    return code


# -- SIGHUP: reload the node config ----------------------------------------------------------
# Changed in place by a reload; every other option needs a restart (the running value is kept).
RELOADED = ("label", "interval", "log_level", "log_json")
NATS_OPTIONS = ("nats", "nats_user", "nats_password", "nats_token", "nats_nkey", "nats_creds",
                "nats_ca", "nats_cert", "nats_key", "nats_js_domain")
SECRETS = frozenset({"nats_password", "nats_token"})
# AgentConfig fields set by options of another name (the rest: field name = option name)
OPTION_OF_FIELD = {"repo_url": "repo", "apps_path": "path", "labels": "label"}


def _shown(key: str, value: Any) -> str:
    """An option's value for a log line or an event: never a secret, never URL credentials."""
    if value is None:
        return "-"
    if key == "label":
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    if key == "nats" and value:
        return ",".join(redact_server(s.strip()) for s in str(value).split(","))
    if key == "interval":
        return f"{value:g}s"
    return str(value)


def config_changes(old_args: argparse.Namespace, old: Any, new_args: argparse.Namespace,
                   new: Any) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """(reloadable key -> (old, new) for what changed, options that need a restart)."""
    values = {"label": (old.labels, new.labels), "interval": (old.interval, new.interval)}
    for key in (*RELOADED[2:], *NATS_OPTIONS):
        values[key] = (getattr(old_args, key, None), getattr(new_args, key, None))
    changed = {key: pair for key, pair in sorted(values.items()) if pair[0] != pair[1]}
    restart = sorted(OPTION_OF_FIELD.get(f.name, f.name) for f in dataclasses.fields(old)
                     if f.name not in ("labels", "interval")
                     and getattr(old, f.name) != getattr(new, f.name))
    return changed, restart


def describe_changes(changed: dict[str, tuple[Any, Any]], restart: list[str]) -> str:
    parts = [f"{key} changed" if key in SECRETS else
             f"{key} {_shown(key, old)} -> {_shown(key, new)}"
             for key, (old, new) in changed.items()]
    text = "; ".join(parts) or "nothing changed"
    if restart:
        text += f" ({', '.join(restart)}: kept, a restart applies them)"
    return text


def _reparse(argv: list[str]) -> argparse.Namespace:
    """The command line again, with the config file and env read anew; UsageError if bad."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parse_args(argv)
    except SystemExit as exc:  # argparse's error, or the config file's
        lines = errors.getvalue().strip().splitlines()
        raise UsageError(lines[-1] if lines else str(exc.code)) from None
    except Exception as exc:  # unreadable YAML, a file that went away...
        raise UsageError(f"{type(exc).__name__}: {exc}") from None


def mesh_link() -> ModuleType:
    """reconciler.mesh.link, loaded only when --nats is given: nats-py and the mesh would cost
    every `node --once` and every agent without a mesh their imports."""
    import reconciler.mesh.link

    return reconciler.mesh.link


class RunningNode:
    """The node process's parts that SIGHUP may replace: its config and its mesh."""

    def __init__(self, agent: Any, args: argparse.Namespace, config: Any) -> None:
        self.agent = agent
        self.args = args
        self.config = config
        self.mesh: Any = None
        self._reloading: asyncio.Task[None] | None = None
        self._again = False

    async def start_mesh(self) -> None:
        if not getattr(self.args, "nats", None):
            return
        try:
            link = mesh_link()
        except ImportError as exc:  # the mesh is optional: the node still reconciles
            log.error("--nats given but the mesh is unavailable: %s", exc)
            return
        self.mesh = link.Mesh(agent=self.agent, outbox=self.agent.store,
                              options=link.NatsOptions.from_args(self.args),
                              heartbeat=self.config.heartbeat)
        self.agent.coordinator = self.mesh.coordinator  # rollout.yaml enforced over NATS
        await self.mesh.start()

    async def close_mesh(self) -> None:
        mesh, self.mesh = self.mesh, None
        self.agent.coordinator = None  # until a new mesh: governed revisions are held
        if mesh is not None:
            with contextlib.suppress(Exception):
                await mesh.close()

    def reload_soon(self) -> None:
        """The SIGHUP handler: one reload at a time; a signal during one runs one more."""
        if self._reloading is not None and not self._reloading.done():
            self._again = True
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        while True:
            self._again = False
            try:
                await self.reload()
            except Exception:  # a reload must never take the agent down
                log.exception("reloading the config failed; the running one is kept")
            if not self._again:
                return

    async def reload(self) -> None:
        try:
            new_args = _reparse(list(getattr(self.args, "argv", None) or sys.argv[1:]))
            new_config = agent_config(new_args)
            if getattr(new_args, "nats", None):
                link = mesh_link()
                try:
                    link.NatsOptions.from_args(new_args).connect_kwargs()  # files, domain ok
                except link.MeshError as exc:
                    raise UsageError(str(exc)) from None
        except UsageError as exc:
            message = f"config not reloaded, the running one is kept: {exc}"
            log.error("SIGHUP: %s", message)
            with self.agent.store.transaction():
                self.agent.record("node.reconfigured", outcome="failure", message=message)
            return
        changed, restart = config_changes(self.args, self.config, new_args, new_config)
        message = describe_changes(changed, restart)
        if not changed:
            log.info("SIGHUP: reloaded the config: %s", message)
            return
        if {"log_level", "log_json"} & set(changed):
            setup_logging(new_args.log_level, new_args.log_json)
            log.debug("logging at level %s from now on", new_args.log_level)
        for key in (*RELOADED, *NATS_OPTIONS):
            setattr(self.args, key, getattr(new_args, key, None))
        if set(NATS_OPTIONS) & set(changed):
            # before the event is recorded: it then goes out on the new connection
            await self.close_mesh()
            await self.start_mesh()
        log.info("SIGHUP: reloaded the config: %s", message)
        self.agent.reconfigure(labels=new_config.labels, interval=new_config.interval,
                               changed=list(changed), message=f"reloaded: {message}")


def print_problems(status: NodeStatus, out: Any) -> None:
    print(f"{status.node}: {status.status} at {(status.revision or '-')[:12]}: "
          f"{status.message}", file=out)
    if status.source_error:
        print(f"  source: {status.source_error}", file=out)
    for error in status.spec_errors:
        print(f"  {error}", file=out)
    for app in status.apps:
        if app.phase != "running" or app.health == "unhealthy" or app.failed_version:
            print(f"  {app.name} {app.version}: {app.phase}/{app.health}: {app.message}",
                  file=out)
