"""Command line: argument parsing, config file / env defaults, and dispatch to command modules.

The one lazy import of the CLI: `resolve_handler` imports a command family's module when one
of its commands runs, so `gitops-mesh validate` does not pay for NATS, the agent or the
console. Every command module imports what it uses at its top. (PyYAML for --config is the
other: a config file is optional.)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reconciler import __version__
from reconciler.cli.logs import setup_logging

ENV_PREFIX = "GITOPS_MESH_"
DEFAULT_STATE_DIR = "/var/lib/gitops-mesh"

# subcommand -> "module:function"; each function takes the parsed Namespace, returns exit code.
HANDLERS: dict[str, str] = {
    "validate": "reconciler.cli.spec_cmds:run_validate",
    "schema": "reconciler.cli.spec_cmds:run_schema",
    "plan": "reconciler.cli.plan_cmds:run_plan",
    "plan-rollout": "reconciler.cli.rollout_cmds:run_plan",
    "node": "reconciler.cli.node_cmds:run_node",
    "status-local": "reconciler.cli.status_cmd:run_status",
    "status-remote": "reconciler.cli.mesh_cmds:run_status",
    "reconcile": "reconciler.cli.mesh_cmds:run_reconcile",
    "wait": "reconciler.cli.wait_cmd:run_wait",
    "rollout": "reconciler.cli.rollout_cmds:run_rollout",
    "notify": "reconciler.cli.notify_cmd:run_notify",
    "nats-config": "reconciler.cli.nats_config_cmd:run_nats_config",
    "suspend": "reconciler.cli.rpc_cmds:run_suspend",
    "resume": "reconciler.cli.rpc_cmds:run_resume",
    "health": "reconciler.cli.rpc_cmds:run_health",
    "state": "reconciler.cli.rpc_cmds:run_state",
    "logs": "reconciler.cli.rpc_cmds:run_logs",
    "nats-init": "reconciler.cli.nats_cmds:run_nats_init",
    "console": "console.cli:run_console",
    "demo": "reconciler.demo:run_demo",
}


def add_nats_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = parser.add_argument_group("NATS connection")
    group.add_argument(
        "--nats",
        required=required,
        help="server URL(s), comma separated for a cluster (nats://host:4222,...)",
    )
    group.add_argument("--nats-user", help="user name (password from --nats-password)")
    group.add_argument("--nats-password", help="password (prefer GITOPS_MESH_NATS_PASSWORD)")
    group.add_argument("--nats-token", help="auth token (prefer GITOPS_MESH_NATS_TOKEN)")
    group.add_argument("--nats-nkey", metavar="SEED_FILE", help="nkey seed file")
    group.add_argument("--nats-creds", metavar="FILE", help=".creds file (JWT + nkey)")
    group.add_argument("--nats-ca", metavar="FILE", help="CA certificate for TLS")
    group.add_argument("--nats-cert", metavar="FILE", help="client certificate for mutual TLS")
    group.add_argument("--nats-key", metavar="FILE", help="client key for mutual TLS")
    group.add_argument(
        "--nats-js-domain", metavar="DOMAIN",
        help="JetStream domain of the events stream and status bucket (the hub's), for "
             "clients of a leaf node server: see docs/nats.md",
    )


def add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", required=True, help="git URL or path of the spec repository")
    parser.add_argument("--branch", default="main", help="branch, tag or commit to track")
    parser.add_argument("--path", default="apps", help="folder of app specs inside the repo")
    parser.add_argument("--node-id", required=True, help="this node's id")
    parser.add_argument(
        "--label", action="append", default=[], metavar="K=V", help="node label (repeatable)"
    )
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR)


def add_rpc_verbs(sub: Any) -> None:
    """suspend, resume, health, state, logs: one node's RPC (reconciler/cli/rpc_cmds.py)."""
    for verb, what in (("suspend", "suspend a node or one app (reconciles skip it)"),
                       ("resume", "resume a node or one app, and reconcile")):
        p = sub.add_parser(verb, help=what)
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--node")
        target.add_argument("--selector", action="append", metavar="K=V",
                            help="every node in the status KV with these labels")
        p.add_argument("--app", help="only this app (default: the whole node)")
    p = sub.add_parser("health", help="probe a node's apps now")
    p.add_argument("--app", help="only this app")
    p = sub.add_parser("state", help="a node's desired and current state (env values hidden)")
    p = sub.add_parser("logs", help="the last lines of an app's log on a node")
    p.add_argument("--app", required=True)
    p.add_argument("--lines", type=int, default=100, help="how many (at most 1000)")
    p.add_argument("--follow", "-f", action="store_true", help="then new lines, until Ctrl-C")
    for verb in ("suspend", "resume", "health", "state", "logs"):
        p = sub.choices[verb]
        if verb not in ("suspend", "resume"):
            p.add_argument("--node", required=True)
        p.add_argument("--timeout", default="10s", help="how long to wait for the node")
        p.add_argument("--json", action="store_true")
        add_nats_args(p, required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gitops-mesh", description="GitOps reconciler for fleets of plain Linux nodes."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--config", metavar="FILE", help="YAML file of option defaults")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument("--log-json", action="store_true", help="JSON log lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check a spec tree; errors as file:line:col")
    p.add_argument("path", help="spec repo root, apps folder or single file")
    p.add_argument("--apps-path", default=None, help="apps folder inside PATH (default: apps)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("schema", help="print a JSON Schema (default: an app document)")
    schema_of = p.add_mutually_exclusive_group()  # one document kind per call
    schema_of.add_argument("--events", action="store_true",
                           help="the schema of events (gitops.events.<node>.<type>)")
    schema_of.add_argument("--rollout", action="store_true",
                           help="the schema of rollout.yaml (fleet rollouts)")

    p = sub.add_parser("plan", help="what a reconcile would do, in order, without doing it")
    add_source_args(p)
    p.add_argument("--json", action="store_true")
    add_nats_args(p)  # optional: read the node's rollout wave state

    p = sub.add_parser("node", help="run the agent")
    add_source_args(p)
    p.add_argument("--interval", default="30s", help="poll interval (jittered)")
    p.add_argument("--once", action="store_true", help="one reconcile, exit 0 when synced")
    p.add_argument("--heartbeat", default="10s", help="status heartbeat interval")
    p.add_argument("--fetch-timeout", default="30s")
    p.add_argument("--stop-apps-on-exit", action="store_true",
                   help="stop every app on shutdown (default: leave running, adopt on start)")
    p.add_argument("--allowed-signers", metavar="FILE",
                   help="require commits signed by a key in this ssh allowed_signers file")
    p.add_argument("--gpg-keyring", metavar="FILE",
                   help="require commits signed by a key in this GPG keyring")
    p.add_argument("--allow-rewind", action="store_true",
                   help="with signature checks: accept a move back to an older revision "
                        "(refused by default: it may replay an old signed commit)")
    p.add_argument("--outbox-max", type=int, default=100_000,
                   help="events kept for NATS while it is down")
    p.add_argument("--port-offset", type=int, default=0,
                   help="added to apps' health ports and exported as GITOPS_PORT_OFFSET "
                        "(several nodes on one host: demo, tests)")
    add_nats_args(p)

    p = sub.add_parser("status", help="node status, local (--state-dir) or remote (--nats)")
    p.add_argument("--state-dir", default=None)
    p.add_argument("--node", default=None, help="with --nats: one node (default: fleet table)")
    p.add_argument("--json", action="store_true")
    add_nats_args(p)

    p = sub.add_parser("reconcile", help="trigger a reconcile now, over NATS")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--node")
    target.add_argument("--all", action="store_true")
    target.add_argument("--selector", action="append", metavar="K=V")
    p.add_argument("--timeout", default="5s", help="how long to collect replies")
    p.add_argument("--json", action="store_true")
    add_nats_args(p, required=True)

    p = sub.add_parser("wait", help="block until targeted nodes are synced at a revision")
    p.add_argument("--revision", required=True)
    p.add_argument("--selector", action="append", default=[], metavar="K=V")
    p.add_argument("--node", action="append", default=[], help="expect these nodes")
    p.add_argument("--timeout", default="120s")
    add_nats_args(p, required=True)

    p = sub.add_parser("rollout", help="a fleet rollout: status, pause, resume, abort, promote")
    p.add_argument("action", choices=["status", "pause", "resume", "abort", "promote"])
    p.add_argument("--revision", required=True, help="full SHA or a unique prefix")
    p.add_argument("--reason", default="", help="why (abort, pause): shown to everyone")
    p.add_argument("--json", action="store_true")
    add_nats_args(p, required=True)

    p = sub.add_parser("notify", help="announce a new revision (git post-receive hook)")
    p.add_argument("--repo", required=True)
    p.add_argument("--branch", required=True)
    p.add_argument("--revision", required=True)
    add_nats_args(p, required=True)

    p = sub.add_parser("nats-config", help="generate a least-privilege nats-server auth block")
    p.add_argument("--node", action="append", default=[], help="node id (repeatable)")
    p.add_argument("--out", required=True, help="directory for the config and credentials")
    p.add_argument("--auth", choices=["nkey", "password"], default="nkey")

    add_rpc_verbs(sub)
    # ---- nats-init (docs/nats.md "Provisioning") ----
    p = sub.add_parser("nats-init", help="create or verify the stream and buckets (admin)")
    p.add_argument("--replicas", type=int, default=None,
                   help="JetStream replicas (default: 3 on a cluster of 3 or more, else 1)")
    p.add_argument("--update", action="store_true",
                   help="change differing settings JetStream can change in place")
    add_nats_args(p, required=True)

    p = sub.add_parser("console", help="the fleet web console")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token", default=None, help="action token (prefer GITOPS_MESH_TOKEN)")
    p.add_argument("--read-only", action="store_true", help="no actions at all")
    p.add_argument("--insecure", action="store_true", help="actions without a token")
    p.add_argument("--events-keep", type=int, default=5000, help="events kept in memory")
    p.add_argument("--trace-url", default=None, metavar="TEMPLATE",
                   help="link event trace ids, e.g. http://jaeger:16686/trace/{trace_id}")
    p.add_argument("--tokens", default=None, metavar="FILE",
                   help="named tokens with roles (YAML/JSON list of {name, token, role: "
                        "viewer|operator})")
    p.add_argument("--repo", default=None, metavar="URL",
                   help="spec repo for the revision history (read-only bare cache clone)")
    p.add_argument("--branch", default=None, help="branch of --repo (default: its HEAD)")
    add_nats_args(p, required=True)

    p = sub.add_parser("demo", help="the whole system on one machine")
    p.add_argument("--state-dir", default=None, help="keep state here (default: a temp dir)")
    p.add_argument("--port", type=int, default=8080, help="console port")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="keep the state dir for a second run")
    return parser


def _option_defaults(
    parser: argparse.ArgumentParser, config: dict[str, Any], environ: dict[str, str]
) -> dict[str, Any]:
    """Defaults from the config file, overridden by GITOPS_MESH_* env (CLI flags win over both)."""
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "command")}
    defaults: dict[str, Any] = {}
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        if dest in known:
            defaults[dest] = _coerce(known[dest], value)
    for dest, action in known.items():
        env_value = environ.get(ENV_PREFIX + dest.upper())
        if env_value is not None:
            defaults[dest] = _coerce(action, env_value)
    return defaults


def _coerce(action: argparse.Action, value: Any) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict):
            return [f"{k}={v}" for k, v in value.items()]
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return [str(item) for item in value]
    if action.type is int:
        return int(value)
    return value if value is None else str(value)


def _load_config(path: str) -> dict[str, Any]:
    import yaml  # only with --config: the NATS commands would pay ~15 ms for it otherwise

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: the config file must be a mapping of option: value")
    return data


def resolve_handler(name: str) -> Callable[[argparse.Namespace], int]:
    """The handler of HANDLERS[name], its family's module imported now (the CLI's one lazy
    import: see the module docstring)."""
    module_name, func_name = HANDLERS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def handler_name(args: argparse.Namespace) -> str:
    """The HANDLERS key of a parsed command line: `status` and `plan` with --nats run the
    code that talks to NATS, without it code that never imports nats-py."""
    if args.command == "status":
        return "status-remote" if args.nats else "status-local"
    if args.command == "plan" and args.nats:
        return "plan-rollout"
    return str(args.command)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # The pre-parse only looks for --config and the command: options that are required on
    # the command line may still come from the config file or env, so relax them for now.
    commands: dict[str, argparse.ArgumentParser] = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr,assignment]
    relaxed: list[Any] = []
    for sp in commands.values():
        items: list[Any] = [*sp._actions, *sp._mutually_exclusive_groups]
        relaxed += [i for i in items if i.required and getattr(i, "option_strings", True)]
    for item in relaxed:
        item.required = False
    pre, _ = parser.parse_known_args(argv)
    for item in relaxed:
        item.required = True
    config = _load_config(pre.config) if pre.config else {}
    # of the global options only the logging ones come from the config file and env too
    logging_defaults = {k: v for k, v in _option_defaults(parser, config, dict(os.environ))
                        .items() if k in ("log_level", "log_json")}
    levels = next(a.choices for a in parser._actions if a.dest == "log_level") or ()
    if logging_defaults.get("log_level", "info") not in levels:
        parser.error(f"log_level {logging_defaults['log_level']!r}: use one of "
                     f"{', '.join(levels)}")
    parser.set_defaults(**logging_defaults)
    if pre.command:
        subparser = commands[pre.command]
        subparser.set_defaults(**_option_defaults(subparser, config, dict(os.environ)))
        # options with required=True are satisfied by config/env defaults too
        for action in subparser._actions:
            if action.required and action.dest in subparser._defaults:
                action.required = False
    args = parser.parse_args(argv)
    args.argv = argv  # `node` parses them again on SIGHUP (config file and env re-read)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    if not args.command:
        build_parser().print_help()
        return 2
    setup_logging(args.log_level, args.log_json)
    try:
        return resolve_handler(handler_name(args))(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `gitops-mesh schema | head`: the reader left; exit quietly like other CLI tools.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
