"""`gitops-mesh console`: build the config from flags/env, refuse unsafe setups, serve."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from nats.aio.client import Client as NATS

from console.app import create_app
from console.config import ConsoleConfig
from console.feed import Connector
from console.state import Console
from console.tokens import Token, parse_tokens


def nats_connector(args: argparse.Namespace) -> Connector:
    """A Connector from the shared --nats* flags (reconciler.mesh.link.NatsOptions and connect)."""
    from reconciler.mesh.link import NatsOptions

    options = NatsOptions.from_args(args)
    options.name = "gitops-mesh-console"
    return _Connector(options)


class _Connector:
    """Connects with the --nats* flags; `js_domain` tells the feed where JetStream is."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.js_domain: str | None = options.js_domain

    async def __call__(self, **callbacks: Any) -> NATS:
        from reconciler.mesh.link import connect

        # the feed asks for endless reconnects; connect() bounds only the first attempt
        return await connect(self.options, timeout=5.0, **callbacks)


def config_from_args(args: argparse.Namespace) -> ConsoleConfig:
    """Raises ValueError for a token file that cannot be read or is not valid."""
    token = args.token or os.environ.get("GITOPS_MESH_TOKEN") or None
    tokens_file = getattr(args, "tokens", None)
    tokens: tuple[Token, ...] = ()
    if tokens_file:
        try:
            text = Path(tokens_file).read_text()
        except OSError as exc:
            raise ValueError(f"--tokens {tokens_file}: {exc.strerror or exc}") from None
        tokens = parse_tokens(text, where=f"--tokens {tokens_file}")
    return ConsoleConfig(
        token=token, read_only=bool(args.read_only), insecure=bool(args.insecure),
        events_keep=args.events_keep, host=args.host,
        trace_url=getattr(args, "trace_url", None) or None,
        tokens=tokens, repo=getattr(args, "repo", None) or None,
        branch=getattr(args, "branch", None) or None,
    )


class ConsoleServer(uvicorn.Server):
    """uvicorn, plus: on SIGINT/SIGTERM the live streams end at once, so open browser
    tabs do not hold the shutdown up to its grace timeout."""

    def __init__(self, config: uvicorn.Config, console: Console) -> None:
        super().__init__(config)
        self.console = console

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.console.close_streams()
        super().handle_exit(sig, frame)


def make_server(config: ConsoleConfig, connect: Connector | None, port: int,
                **app_kwargs: Any) -> ConsoleServer:
    """An uvicorn server for the console (call .run() or serve it in a thread)."""
    app = create_app(config, connect, **app_kwargs)
    return ConsoleServer(uvicorn.Config(
        app, host=config.host, port=port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=2, lifespan="on",
    ), app.state.console)


def run_console(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        config.check()
    except ValueError as exc:
        print(f"gitops-mesh console: error: {exc}", file=sys.stderr)
        return 2
    if config.insecure and config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"gitops-mesh console: warning: actions WITHOUT a token on {config.host}; "
              "anyone who can reach this port can reconcile and suspend nodes", file=sys.stderr)
    server = make_server(config, nats_connector(args), args.port)
    mode = ("read-only" if config.read_only else
            "actions without a token" if config.insecure else "actions need the token")
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"console: http://{host}:{args.port}/ ({mode})", flush=True)
    server.run()
    return 0
