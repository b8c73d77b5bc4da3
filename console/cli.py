"""`gitops-mesh console`: build the config from flags/env, refuse unsafe setups, serve."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from typing import Any

import nats
import uvicorn
from nats.aio.client import Client as NATS

from console.app import ConsoleConfig, create_app
from console.feed import Connector


def nats_connector(args: argparse.Namespace) -> Connector:
    """A Connector from the shared --nats* flags (reconciler.bus.NatsOptions when present)."""
    try:
        from reconciler.bus import NatsOptions, connect  # H5's connection options
    except ImportError:
        return _plain_connector(args)
    options = NatsOptions.from_args(args)

    async def connect_with(**callbacks: Any) -> NATS:
        return await connect(options, **callbacks)

    return connect_with


def _plain_connector(args: argparse.Namespace) -> Connector:
    servers = [s.strip() for s in (args.nats or "").split(",") if s.strip()]
    kwargs: dict[str, Any] = {"servers": servers, "name": "gitops-mesh-console",
                              "connect_timeout": 5}
    if getattr(args, "nats_user", None):
        kwargs["user"] = args.nats_user
        kwargs["password"] = args.nats_password or os.environ.get("GITOPS_MESH_NATS_PASSWORD")
    if getattr(args, "nats_token", None):
        kwargs["token"] = args.nats_token
    if getattr(args, "nats_nkey", None):
        kwargs["nkeys_seed"] = args.nats_nkey
    if getattr(args, "nats_creds", None):
        kwargs["user_credentials"] = args.nats_creds
    if getattr(args, "nats_ca", None) or getattr(args, "nats_cert", None):
        context = ssl.create_default_context(cafile=args.nats_ca)
        if args.nats_cert:
            context.load_cert_chain(args.nats_cert, args.nats_key)
        kwargs["tls"] = context

    async def connect_with(**callbacks: Any) -> NATS:
        return await nats.connect(**kwargs, **callbacks)

    return connect_with


def config_from_args(args: argparse.Namespace) -> ConsoleConfig:
    token = args.token or os.environ.get("GITOPS_MESH_TOKEN") or None
    return ConsoleConfig(
        token=token, read_only=bool(args.read_only), insecure=bool(args.insecure),
        events_keep=args.events_keep, host=args.host,
    )


def make_server(config: ConsoleConfig, connect: Connector | None, port: int,
                **app_kwargs: Any) -> uvicorn.Server:
    """An uvicorn server for the console (call .run() or serve it in a thread)."""
    app = create_app(config, connect, **app_kwargs)
    return uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=2, lifespan="on",
    ))


def run_console(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
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
