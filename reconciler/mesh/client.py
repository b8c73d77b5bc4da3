"""The one NATS client of the CLI and the console: node RPC, fleet scatter-gather, KV reads.

Failures become `RpcError` values carrying an HTTP-like status (the console answers with it,
the CLI prints the message):

    503  no node answers (no responders), or the connection went away
    504  no answer within the deadline
    502  the node failed (micro service error 5xx), or something else answered
    4xx  the node refused the request (micro service error 4xx)

"No responders" is retried within the caller's deadline: during a failover the node is
reconnecting to another server for a moment. A JetStream ack in place of the node's answer
(a stream that captures `gitops.rpc.>`) is never taken for the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from reconciler.mesh.conn import MeshError, no_jetstream, reason_of
from reconciler.mesh.subjects import rpc_subject

T = TypeVar("T")

RPC_TIMEOUT_S = 5.0
NO_RESPONDERS_RETRY_S = 0.2
# A node that reconnects to another server is back within about a second: "no responders"
# is retried this long (within the caller's deadline), then reported.
NO_RESPONDERS_GRACE_S = 2.0
WATCH_HEARTBEAT_S = 0.5  # a follower's consumer is re-made after two missed heartbeats
FOLLOW_API_TIMEOUT_S = 1.0
# Errors that mean "the cluster is busy failing over" (leader election, reconnect): retry.
TRANSIENT = (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
             nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
             nats.errors.StaleConnectionError, nats.js.errors.ServiceUnavailableError)
_PUB_ACK_KEYS = {"stream", "seq", "domain", "duplicate", "val"}


class RpcError(MeshError):
    """An RPC that brought no usable answer; `status` is HTTP-like (above), `code` the node's
    own micro service error code as it sent it ("400", "500"), None if the node sent none."""

    def __init__(self, message: str, status: int, code: str | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail or message  # the node's own words for a service error

    @property
    def silent(self) -> bool:
        """No node answered at all (no responders, or nothing within the deadline)."""
        return self.status in (503, 504) and self.code is None


def is_jetstream_ack(data: Any) -> bool:
    """A JetStream publish ack ({"stream", "seq"}): what a stream capturing the subject sends."""
    return isinstance(data, dict) and "stream" in data and "seq" in data \
        and set(data) <= _PUB_ACK_KEYS


def _status_header(msg: Msg) -> str | None:
    return msg.headers.get("Status") if msg.headers else None


async def call(nc: NATS, node: str, endpoint: str, body: dict[str, Any] | None = None,
               timeout: float = RPC_TIMEOUT_S) -> Any:
    """Call `gitops.rpc.<node>.<endpoint>` and return its JSON answer, or raise RpcError."""
    subject = rpc_subject(node, endpoint)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    payload = json.dumps(body).encode() if body else b""
    captured_by: str | None = None
    grace_until: float | None = None
    while True:
        replies: asyncio.Queue[Msg] = asyncio.Queue()
        inbox = nc.new_inbox()

        try:
            sub = await nc.subscribe(inbox, cb=_queue_into(replies))
        except nats.errors.Error as exc:
            raise RpcError(f"NATS: {exc}", 503) from None
        no_responders = False
        try:
            await nc.publish(subject, payload, reply=inbox, headers=None)
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    msg = await asyncio.wait_for(replies.get(), left)
                except TimeoutError:
                    break
                if _status_header(msg) == "503":
                    no_responders = True
                    break
                data = _json(msg, node, endpoint)
                if is_jetstream_ack(data):
                    captured_by = str(data["stream"])
                    continue  # the node's own answer may still come
                _raise_service_error(msg, node, endpoint)
                return data
        except nats.errors.Error as exc:
            if not isinstance(exc, TRANSIENT):
                raise RpcError(f"NATS: {exc}", 503) from None
            no_responders = True  # reconnecting: try again within the deadline
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if no_responders:
            grace_until = grace_until or loop.time() + NO_RESPONDERS_GRACE_S
            if loop.time() + NO_RESPONDERS_RETRY_S < min(deadline, grace_until):
                await asyncio.sleep(NO_RESPONDERS_RETRY_S)
                continue
        if captured_by is not None:
            raise RpcError(
                f"node {node!r} {endpoint}: only JetStream stream {captured_by} answered "
                f"(it captures {subject}: its ack is not the node's answer; fix the stream's "
                "subjects with `gitops-mesh nats-init`)", 502)
        if no_responders:
            raise RpcError(f"node {node!r} is not answering (no responders)", 503)
        raise RpcError(f"node {node!r} did not answer within {timeout:g}s", 504)


def _queue_into(queue: asyncio.Queue[Msg]) -> Callable[[Msg], Awaitable[None]]:
    async def on_reply(msg: Msg) -> None:
        queue.put_nowait(msg)

    return on_reply


def _json(msg: Msg, node: str, endpoint: str) -> Any:
    try:
        return json.loads(msg.data) if msg.data else {}
    except ValueError:
        raise RpcError(f"node {node!r} {endpoint}: the reply is not JSON", 502) from None


def _raise_service_error(msg: Msg, node: str, endpoint: str) -> None:
    headers = msg.headers or {}
    if "Nats-Service-Error-Code" not in headers and "Nats-Service-Error" not in headers:
        return
    code = headers.get("Nats-Service-Error-Code", "500")
    text = headers.get("Nats-Service-Error", "error")
    # the node's own 4xx (bad request) pass through; its failures are a bad gateway
    status = int(code) if code.isdigit() and 400 <= int(code) < 500 else 502
    raise RpcError(f"node {node!r} {endpoint}: error {code}: {text}", status, code, text)


def reply_of(node: str, endpoint: str, data: Any, key: str = "node") -> dict[str, Any]:
    """An answer that must be an object naming `node` (status, reconcile, ...)."""
    if not isinstance(data, dict) or data.get(key) != node:
        raise RpcError(f"node {node!r} {endpoint}: the answer is not from the node "
                       f"({str(data)[:80]!r})", 502)
    return data


async def scatter(nc: NATS, subject: str, body: dict[str, Any], window: float,
                  expected: set[str] | None = None) -> list[dict[str, Any]]:
    """Publish a request and gather one JSON object reply per node, sorted by node: for
    `window` seconds, or until every node of `expected` (when given, non-empty) answered.
    JetStream acks and unreadable replies are ignored."""
    replies: dict[str, dict[str, Any]] = {}
    complete = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        try:
            data = json.loads(msg.data)
        except ValueError:
            return
        if not isinstance(data, dict) or is_jetstream_ack(data) or "node" not in data:
            return
        replies[str(data["node"])] = data
        if expected and expected <= set(replies):
            complete.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
        await nc.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(complete.wait(), window)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return [replies[n] for n in sorted(replies)]


# ---- KV ------------------------------------------------------------------------------------
def jetstream(nc: NATS, js_domain: str | None = None, timeout: float = 5.0
              ) -> JetStreamContext:
    return nc.jetstream(domain=js_domain, timeout=timeout) if js_domain \
        else nc.jetstream(timeout=timeout)


def no_jetstream_here(exc: BaseException) -> bool:
    """No JetStream on this server at all (no responders), as opposed to a cluster that is
    electing a leader ("JetStream system temporarily unavailable", retried)."""
    return isinstance(exc, nats.js.errors.ServiceUnavailableError) and not exc.description


async def open_bucket(nc: NATS, name: str, js_domain: str | None = None,
                      timeout: float = 5.0) -> KeyValue | None:
    """The bucket, None if it does not exist (yet); MeshError if no JetStream answers here.
    Callers that retry use a short `timeout`: a request sent while a stream elects its
    leader gets no answer at all, however long one waits."""
    try:
        return await jetstream(nc, js_domain, timeout).key_value(name)
    except nats.js.errors.BucketNotFoundError:
        return None
    except nats.js.errors.ServiceUnavailableError as exc:
        if no_jetstream_here(exc):
            raise MeshError(no_jetstream(js_domain)) from None
        raise


async def retrying(op: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    """`op()` again after transient failures (failover) until `timeout`; then MeshError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.1
    while True:
        try:
            return await op()
        except TRANSIENT as exc:
            if loop.time() + delay >= deadline:
                raise MeshError(f"{what}: {reason_of(exc)} (retried for {timeout:g}s)") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def get_entry(kv: KeyValue, key: str) -> KeyValue.Entry | None:
    """The key's latest entry, None if it has none."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    return entry if entry.value else None


class KvEntry:
    """One key's latest value as followed (value None: deleted or purged)."""

    __slots__ = ("created", "key", "value")

    def __init__(self, key: str, value: bytes | None, created: datetime | None) -> None:
        self.key, self.value, self.created = key, value, created


class KvFollower:
    """The latest entry of every key of a bucket, followed live across failovers.

    An ordered consumer with short idle heartbeats: when its server dies or the stream's
    leader moves, nats-py re-makes it from the last sequence seen after two missed
    heartbeats (nats-py's kv.watch uses 5 s, so a watcher went blind for 10-20 s).
    `caught_up` is set once the values present at the start have arrived; `changed` on
    every update (the reader clears it).
    """

    def __init__(self, nc: NATS, bucket: str, js_domain: str | None = None,
                 heartbeat: float = WATCH_HEARTBEAT_S) -> None:
        self._nc = nc
        self.bucket = bucket
        # short API timeouts: a consumer re-made during a failover is retried soon
        self._js = jetstream(nc, js_domain, timeout=FOLLOW_API_TIMEOUT_S)
        self._heartbeat = heartbeat
        self._prefix = f"$KV.{bucket}."
        self.entries: dict[str, KvEntry] = {}
        self.changed = asyncio.Event()
        self.caught_up = asyncio.Event()
        self._sub: Any = None

    async def start(self) -> None:
        from nats.js.api import DeliverPolicy

        self._sub = await self._js.subscribe(
            f"{self._prefix}>", stream=f"KV_{self.bucket}", cb=self._on_msg,
            ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            idle_heartbeat=self._heartbeat, inactive_threshold=60.0)
        # each delivery says how many are still pending, and the one with none left sets
        # caught_up; only a bucket that delivered nothing at all is caught up here (a value
        # already delivered but not yet through _on_msg leaves num_pending at 0 too)
        info = await self._sub.consumer_info()
        if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
            self.caught_up.set()

    async def _on_msg(self, msg: Msg) -> None:
        key = msg.subject[len(self._prefix):]
        headers = msg.headers or {}
        op = headers.get("KV-Operation") or ("PURGE" if headers.get("Nats-Marker-Reason")
                                              else None)
        created = None
        pending = 0
        with contextlib.suppress(Exception):
            created = msg.metadata.timestamp
            pending = msg.metadata.num_pending
        self.entries[key] = KvEntry(key, None if op in ("DEL", "PURGE") else msg.data, created)
        if pending == 0:
            self.caught_up.set()
        self.changed.set()

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
