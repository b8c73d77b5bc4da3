"""NATS ingestion for the console: KV status watch + event stream replay/follow into a Fleet.

The I/O shell around console.fleet. It survives NATS restarts: on every (re)connect it
re-watches the KV bucket (latest value per key) and resumes the event stream right after
the last stream sequence it applied, so nothing is lost or applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from console.fleet import Fleet
from reconciler.mesh import subjects
from reconciler.mesh.client import WATCH_HEARTBEAT_S, no_jetstream_here
from reconciler.mesh.conn import js_api_prefix, no_jetstream
from reconciler.mesh.provision import Finding, ensure, events_stream, mismatch_message, nodes_bucket
from reconciler.mesh.rollouts import rollouts_bucket

log = logging.getLogger("gitops_mesh.console.feed")

FETCH_BATCH = 500
PULL_EXPIRES_S = 5.0
CHECK_INTERVAL_S = 2.0  # how often the console checks its streams and consumer (failover)


class Connector(Protocol):
    def __call__(self, **callbacks: Any) -> Awaitable[NATS]:
        """Connect with nats-py callbacks (disconnected_cb, reconnected_cb, ...) added.

        A connector may carry a `js_domain` attribute (console.cli's does): the JetStream
        domain of the stream and bucket, needed when it connects to a leaf node server."""


class Feed:
    """Keeps `fleet` current from NATS; calls `on_change` after every applied update.

    `replay_s` / `replay_max`: at start, events of the last `replay_s` seconds are replayed,
    but at most the newest `replay_max` of them are parsed (older ones are skipped cheaply).
    `js_domain`: JetStream domain of the stream and bucket (default: the connector's
    `js_domain` attribute, else the local JetStream).
    """

    def __init__(
        self,
        fleet: Fleet,
        connect: Connector,
        *,
        on_change: Callable[[], None] = lambda: None,
        replay_s: float = 3600.0,
        replay_max: int = 100_000,
        create_missing: bool = True,
        check_interval: float = CHECK_INTERVAL_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        js_domain: str | None = None,
    ) -> None:
        self.fleet = fleet
        self.js_domain: str | None = (
            js_domain if js_domain is not None else getattr(connect, "js_domain", None))
        self._connect = connect
        self._on_change = on_change
        self.replay_s = replay_s
        self.replay_max = replay_max
        self.create_missing = create_missing
        self.check_interval = check_interval
        self._clock = clock
        self.nc: NATS | None = None
        self.state = "connecting"
        self.last_error: str | None = None
        self.last_seq = 0  # last event stream sequence applied
        self.skipped = 0   # replayed events skipped because of replay_max
        self.synced = asyncio.Event()  # set once KV and stream subscriptions are in place
        self._resync = asyncio.Event()
        self._subs: list[JetStreamContext.PushSubscription] = []
        self._inbox_sub: Subscription | None = None  # replies to our pull requests
        self._consumer: str | None = None
        self._inbox = ""
        self._wanted = 0          # messages the open pull request may still deliver
        self._requested_at = 0.0  # monotonic time of the open pull request
        self._received = 0
        self._stream_id: tuple[Any, Any] | None = None  # (created, name) of the stream read
        self._from_start = False
        self._kv_stream_id: tuple[Any, Any] | None = None
        self._rollouts_watched = False
        self.findings: list[Finding] = []  # what verification found at the last subscribe

    @property
    def mismatch(self) -> str | None:
        """The stream or bucket does not have the documented settings (None: all is well)."""
        return mismatch_message(self.findings)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def run(self) -> None:
        """Connect (retrying forever), subscribe, and re-subscribe after every reconnect."""
        try:
            while self.nc is None:
                try:
                    self.nc = await self._connect(
                        disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
                        error_cb=self._error, max_reconnect_attempts=-1,
                        reconnect_time_wait=0.5,
                    )
                except Exception as exc:  # connection refused, DNS, TLS, auth
                    self._set_state("connecting", f"cannot connect to NATS: {exc}")
                    await asyncio.sleep(1.0)
            while True:
                while not self.nc.is_connected:
                    # a resubscribe asked for while NATS is away waits for the reconnect
                    # (JetStream requests now would only time out)
                    await asyncio.sleep(0.1)
                try:
                    await self._subscribe(self._jetstream())
                except nats.js.errors.ServiceUnavailableError as exc:
                    why = no_jetstream(self.js_domain) if no_jetstream_here(exc) else repr(exc)
                    self._set_state("waiting", f"cannot subscribe: {why}")
                    await asyncio.sleep(0.5)
                    continue
                except Exception as exc:  # stream missing and not creatable, timeouts
                    self._set_state("waiting", f"cannot subscribe: {exc}")
                    await asyncio.sleep(0.5)
                    continue
                self._set_state("live", None)
                self.synced.set()
                while not self._resync.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._resync.wait(), self.check_interval)
                    if not self._resync.is_set() and self.connected:
                        await self._check_consumers()
                        await self._check_pull()
                self._resync.clear()
                self.synced.clear()
        finally:
            self.state = "closed"
            await self._unsubscribe()
            if self.nc is not None and not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    await self.nc.close()

    async def _check_consumers(self) -> None:
        """Streams get deleted and made again (bucket re-made, stream recreated by an
        operator): our consumers are then gone or point past the new sequence numbers.
        Compare each stream's identity with the one we subscribed to; resubscribe if new."""
        js = self._jetstream()
        if not self._rollouts_watched:
            with contextlib.suppress(Exception):  # the rollouts bucket appeared: watch it
                await js.stream_info(subjects.ROLLOUTS_STREAM)
                self._resync.set()
                return
        try:
            for name, seen in ((subjects.EVENTS_STREAM, self._stream_id),
                               (subjects.KV_STREAM, self._kv_stream_id)):
                info = await js.stream_info(name)
                if (info.created, info.config.name) != seen:
                    self._set_state("waiting", f"stream {name} was recreated; resubscribing")
                    self._resync.set()
                    return
            if self._consumer is not None:
                # an R1 consumer lives on one server: if that one died, ours is gone
                await js.consumer_info(subjects.EVENTS_STREAM, self._consumer)
        except nats.js.errors.NotFoundError:
            self._set_state("waiting", "a stream or consumer of the console vanished; "
                            "resubscribing")
            self._resync.set()
        except Exception as exc:  # a timeout says nothing about the streams
            log.debug("stream check failed: %r", exc)

    def _set_state(self, state: str, error: str | None) -> None:
        if (state, error) != (self.state, self.last_error):
            if error:
                log.warning("%s", error)
            else:
                log.info("console feed %s (events from stream seq %d)", state, self.last_seq + 1)
        self.state, self.last_error = state, error

    def _jetstream(self) -> JetStreamContext:
        assert self.nc is not None
        return self.nc.jetstream(domain=self.js_domain) if self.js_domain else self.nc.jetstream()

    async def _disconnected(self) -> None:
        if self.state == "closed":
            return
        self._set_state("disconnected", "NATS connection lost; reconnecting")

    async def _reconnected(self) -> None:
        # A restarted server has forgotten our ephemeral consumers: subscribe again.
        self._resync.set()

    async def _error(self, exc: Exception) -> None:
        log.debug("nats: %r", exc)

    async def _unsubscribe(self) -> None:
        inbox_sub, self._inbox_sub = self._inbox_sub, None
        if inbox_sub is not None:
            with contextlib.suppress(Exception):
                await inbox_sub.unsubscribe()
        consumer, self._consumer = self._consumer, None
        if consumer is not None and self.connected:
            assert self.nc is not None
            with contextlib.suppress(Exception):  # it expires on its own otherwise
                await self._jetstream().delete_consumer(subjects.EVENTS_STREAM, consumer)
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _subscribe(self, js: JetStreamContext) -> None:
        await self._unsubscribe()
        self.findings = [await ensure(js, events_stream(), create_missing=self.create_missing),
                         await ensure(js, nodes_bucket(), create_missing=self.create_missing)]
        info = await js.stream_info(subjects.EVENTS_STREAM)
        created = (info.created, info.config.name)
        if self.last_seq and (created != self._stream_id
                              or info.state.last_seq < self.last_seq):
            # The stream was deleted and made again: its sequence numbers start over.
            log.warning("event stream %s was recreated; reading it from its start",
                        subjects.EVENTS_STREAM)
            self.last_seq = 0
            self._from_start = True
        self._stream_id = created
        kv_info = await js.stream_info(subjects.KV_STREAM)
        kv_id = (kv_info.created, kv_info.config.name)
        if self._kv_stream_id is not None and kv_id != self._kv_stream_id:
            # A new bucket: statuses of the old one are gone; the watch below re-fills.
            self.fleet.clear_nodes()
            self._on_change()
        self._kv_stream_id = kv_id
        kv_sub = await js.subscribe(
            f"{subjects.KV_SUBJECT_PREFIX}.>", stream=subjects.KV_STREAM, cb=self._on_kv,
            ordered_consumer=True, deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            idle_heartbeat=WATCH_HEARTBEAT_S,
        )
        self._subs.append(kv_sub)
        # coordinated rollouts (rollout.yaml): their entries, live, like the node statuses.
        # No bucket yet (no governed revision, and not ours to create): watched once it is
        # there (_check_consumers notices it)
        self._rollouts_watched = await rollouts_bucket(js, create=self.create_missing) is not None
        if self._rollouts_watched:
            rollout_sub = await js.subscribe(
                f"{subjects.ROLLOUTS_SUBJECT_PREFIX}.>", stream=subjects.ROLLOUTS_STREAM,
                cb=self._on_rollout, ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT, idle_heartbeat=2.0,
            )
            self._subs.append(rollout_sub)
        # Events come through a pull consumer, one request of FETCH_BATCH at a time, handled
        # in the inbox callback: memory stays flat during a replay of millions (at most one
        # batch in flight) and per-message cost stays low (no per-message timers).
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, mem_storage=True, num_replicas=1,
            inactive_threshold=60.0,
        )
        if self.last_seq:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.last_seq + 1
        elif self._from_start:
            config.deliver_policy = api.DeliverPolicy.ALL
        else:
            config.deliver_policy = api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = self._clock() - timedelta(seconds=self.replay_s)
        consumer = await js.add_consumer(subjects.EVENTS_STREAM, config=config)
        self._consumer = consumer.name
        assert self.nc is not None
        self._inbox = self.nc.new_inbox()
        self._inbox_sub = await self.nc.subscribe(self._inbox, cb=self._on_pulled)
        await self._pull_more()

    async def _pull_more(self) -> None:
        """One pull request for the next batch; the server holds it up to PULL_EXPIRES_S
        when the stream is quiet, so new events still arrive at once."""
        if self._consumer is None or self.nc is None:
            return
        body = {"batch": FETCH_BATCH, "expires": int(PULL_EXPIRES_S * 1e9)}
        self._wanted = FETCH_BATCH
        self._requested_at = time.monotonic()
        await self.nc.publish(
            f"{js_api_prefix(self.js_domain)}.CONSUMER.MSG.NEXT.{subjects.EVENTS_STREAM}."
            f"{self._consumer}",
            json.dumps(body).encode(), reply=self._inbox)

    async def _on_pulled(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status:
            if status == "100":
                return  # idle heartbeat
            if status in ("404", "408"):  # no messages / the request expired: ask again
                await self._pull_more()
                return
            why = msg.headers.get("Description", "") if msg.headers else ""
            if "shutdown" in why.lower():
                return  # the server is going away: the reconnect resubscribes
            # 409 consumer deleted, leadership change, ...: start over from last_seq
            self._set_state("waiting", f"event stream interrupted: {status} {why}")
            self._resync.set()
            return
        self._apply_event(msg)
        self._wanted -= 1
        self._received += 1
        self._on_change()
        if self._wanted <= 0:
            await self._pull_more()
        if self._received % 32 == 0:
            # nats-py runs this callback back to back while messages are queued: let HTTP
            # requests and SSE pushes in between, or a burst would stall the whole console.
            await asyncio.sleep(0)

    async def _check_pull(self) -> None:
        """A pull request whose end we never heard of (lost in a reconnect) would stall
        the events: re-ask when it is well past its expiry."""
        if time.monotonic() - self._requested_at > PULL_EXPIRES_S + 2:
            await self._pull_more()

    async def _on_kv(self, msg: Msg) -> None:
        key = msg.subject[len(subjects.KV_SUBJECT_PREFIX) + 1:]
        op = msg.headers.get("KV-Operation") if msg.headers else None
        if msg.headers and not op and msg.headers.get("Nats-Marker-Reason"):
            op = "PURGE"  # server-placed expiry marker (nats-server 2.11+)
        error = self.fleet.apply_status(key, None if op in ("DEL", "PURGE") else msg.data)
        if error:
            log.warning("ignored: %s", error)
        self._on_change()

    async def _on_rollout(self, msg: Msg) -> None:
        key = msg.subject[len(subjects.ROLLOUTS_SUBJECT_PREFIX) + 1:]
        op = msg.headers.get("KV-Operation") if msg.headers else None
        error = self.fleet.apply_rollout(key, None if op in ("DEL", "PURGE") else msg.data)
        if error:
            log.warning("ignored: %s", error)
        self._on_change()

    def _apply_event(self, msg: Msg) -> None:
        seq, pending = stream_position(msg)
        if seq <= self.last_seq:
            return  # already applied before a resubscribe
        self.last_seq = seq
        if pending >= self.replay_max:
            self.skipped += 1  # replaying more than we keep: skip the parse
            return
        error = self.fleet.apply_event(msg.subject, msg.data)
        if error:
            log.warning("ignored %s: %s", msg.subject, error)


def stream_position(msg: Msg) -> tuple[int, int]:
    """(stream sequence, messages still pending) of a JetStream delivery, read from its reply
    subject as nats-py's `Msg.metadata` reads it, without building its metadata objects
    (a datetime and three dataclasses per event: most of the feed's own cost in a replay).

    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (9 tokens) or,
    with domain and account hash, `$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.
    <sseq>.<cseq>.<ts>.<pending>[.<random>]`; anything else goes to nats-py (which raises).
    """
    tokens = (msg.reply or "").split(".")
    if tokens[0] == "$JS" and len(tokens) > 1 and tokens[1] == "ACK":
        if len(tokens) == 9:
            return int(tokens[5]), int(tokens[8])
        if len(tokens) >= 11:
            return int(tokens[7]), int(tokens[10])
    meta = msg.metadata
    return meta.sequence.stream, meta.num_pending
