"""NATS connection options and the one-shot connect of CLI commands (light: no pydantic)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.client import Client as NATS

from reconciler.core.errors import TransientError
from reconciler.core.redact import redact_server

if TYPE_CHECKING:  # `notify` (a git hook) imports this module: keep JetStream out of it
    from nats.js.client import JetStreamContext


class MeshError(TransientError):
    """NATS could not be reached or refused a request (the message names the server)."""


@dataclass
class NatsOptions:
    """How to reach NATS. Secrets live only here and are never logged or put in errors."""

    servers: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed_file: str | None = None
    creds_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    name: str | None = None
    # Replies come to <inbox_prefix>.>; least-privilege configs give each identity its own.
    inbox_prefix: str | None = None
    # JetStream domain of the stream and bucket (the hub's), for clients of a leaf node
    # server: JetStream API traffic crosses a leaf connection only as $JS.<domain>.API.>.
    js_domain: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NatsOptions:
        raw = getattr(args, "nats", None) or "nats://127.0.0.1:4222"
        servers = [s.strip() for s in str(raw).split(",") if s.strip()]
        return cls(
            servers=servers,
            user=getattr(args, "nats_user", None),
            password=getattr(args, "nats_password", None),
            token=getattr(args, "nats_token", None),
            nkey_seed_file=getattr(args, "nats_nkey", None),
            creds_file=getattr(args, "nats_creds", None),
            ca_file=getattr(args, "nats_ca", None),
            cert_file=getattr(args, "nats_cert", None),
            key_file=getattr(args, "nats_key", None),
            js_domain=getattr(args, "nats_js_domain", None) or None,
        )

    def describe(self) -> str:
        """The server list without any user:password@ part (safe for logs and errors)."""
        return ",".join(redact_server(s) for s in self.servers)

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for nats.connect (credentials included: do not log)."""
        for label, path in (
            ("nkey seed file", self.nkey_seed_file), ("creds file", self.creds_file),
            ("CA file", self.ca_file), ("client certificate", self.cert_file),
            ("client key", self.key_file),
        ):
            if path and not os.path.isfile(path):
                raise MeshError(f"NATS {label} {path!r} does not exist")
        check_js_domain(self.js_domain)
        kw: dict[str, Any] = {"servers": list(self.servers)}
        if self.user:
            kw["user"] = self.user
            kw["password"] = self.password or ""
        if self.token:
            kw["token"] = self.token
        if self.nkey_seed_file:
            kw["nkeys_seed"] = self.nkey_seed_file
        if self.creds_file:
            kw["user_credentials"] = self.creds_file
        if self.ca_file or self.cert_file:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            kw["tls"] = ctx
        if self.name:
            kw["name"] = self.name
        if self.inbox_prefix:
            kw["inbox_prefix"] = self.inbox_prefix
        return kw


    def jetstream(self, nc: NATS, timeout: float = 5.0) -> JetStreamContext:
        """A JetStream context addressing `js_domain` (the local JetStream without one);
        `timeout` bounds each API request (one sent during a leader election is never
        answered, so long-lived clients keep it short)."""
        return nc.jetstream(domain=self.js_domain, timeout=timeout) if self.js_domain \
            else nc.jetstream(timeout=timeout)

    def kv_put_subject(self, bucket: str, key: str) -> str:
        """Where a KV put goes: `$KV.<bucket>.<key>`, or with a domain
        `$JS.<domain>.API.$KV.<bucket>.<key>` (the server maps it into the domain's bucket).

        nats-py's KeyValue.put always uses the bare subject, which no server answers across
        a leaf connection; nats.go prefixes puts the same way when a domain is set.
        """
        return f"{js_api_prefix(self.js_domain)}.$KV.{bucket}.{key}" if self.js_domain \
            else f"$KV.{bucket}.{key}"


_DOMAIN = re.compile(r"[A-Za-z0-9_-]+")


def check_js_domain(domain: str | None) -> None:
    """A JetStream domain is one subject token (it goes into $JS.<domain>.API)."""
    if domain is not None and not _DOMAIN.fullmatch(domain):
        raise MeshError(f"--nats-js-domain {domain!r}: expected letters, digits, '-' or '_' "
                        "(one NATS subject token, as in the server's jetstream {domain: ...})")


def js_api_prefix(domain: str | None) -> str:
    """The JetStream API subject prefix: `$JS.API`, or `$JS.<domain>.API` for a domain."""
    return f"$JS.{domain}.API" if domain else "$JS.API"


def no_jetstream(domain: str | None) -> str:
    """Why a JetStream request found no responder, and what to check."""
    if domain:
        return (f"no JetStream answers in domain {domain!r} (is it the hub's jetstream "
                "{domain: ...}, and is this leaf node connected to the hub?)")
    return ("no JetStream answers on this server (if it is a leaf node server, set "
            "--nats-js-domain to the hub's JetStream domain)")


def reason_of(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.removeprefix("nats: ")


_TELLING = (ssl.SSLError, nats.errors.AuthorizationError)
# A server that refuses a CONNECT writes -ERR and closes; when our PING is still unread
# there, its kernel answers with a reset that can discard the -ERR on our side. A fresh
# attempt usually reads the real reason.
_RESET_ATTEMPTS = 3


async def connect(opts: NatsOptions, timeout: float = 5.0, **kw: Any) -> NATS:
    """One-shot connection for CLI commands: bounded, and a clear error naming the server.

    TLS and authorization failures end the attempt at once (retrying cannot fix them); a bare
    connection reset is tried again a couple of times, since it can hide the server's reason.
    `kw` goes to nats.connect (an `error_cb` there is called too, for later errors as well).
    """
    deadline = asyncio.get_running_loop().time() + timeout
    cause: BaseException = TimeoutError(f"no connection within {timeout:g}s")
    reset = False
    for attempt in range(1, _RESET_ATTEMPTS + 1):
        remaining = max(0.1, deadline - asyncio.get_running_loop().time())
        nc, failure = await _connect_once(opts, remaining, dict(kw))
        if nc is not None:
            return nc
        cause = failure or cause
        reset = isinstance(cause, ConnectionResetError)
        if not reset or attempt == _RESET_ATTEMPTS or remaining <= 0.1:
            break
    reason = reason_of(cause)
    if reset and (opts.user or opts.token or opts.nkey_seed_file or opts.creds_file):
        reason += " (a server that refuses these credentials may reset the connection)"
    raise MeshError(f"cannot connect to NATS at {opts.describe()}: {reason}")


async def _connect_once(
    opts: NatsOptions, timeout: float, kw: dict[str, Any]
) -> tuple[NATS | None, BaseException | None]:
    """(connection, None) or (None, the most telling error of this attempt)."""
    errors: list[BaseException] = []
    hopeless = asyncio.Event()
    user_cb = kw.pop("error_cb", None)

    async def on_error(exc: Exception) -> None:
        errors.append(exc)
        if isinstance(exc, _TELLING):
            hopeless.set()
        if user_cb is not None:
            await user_cb(exc)

    options = {
        "connect_timeout": min(2.0, timeout),
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.2,
        **opts.connect_kwargs(),
        **kw,
        "error_cb": on_error,
    }
    nc = NATS()
    connecting = asyncio.ensure_future(nc.connect(**options))
    giving_up = asyncio.ensure_future(hopeless.wait())
    await asyncio.wait({connecting, giving_up}, timeout=timeout,
                       return_when=asyncio.FIRST_COMPLETED)
    giving_up.cancel()
    failure: BaseException | None = None
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        failure = TimeoutError(f"no connection within {timeout:g}s")
    elif connecting.exception() is not None:
        failure = connecting.exception()
    if failure is None:
        return nc, None
    with contextlib.suppress(Exception):
        await nc.close()
    telling = [e for e in errors if isinstance(e, _TELLING)]
    return None, telling[-1] if telling else errors[-1] if errors else failure
