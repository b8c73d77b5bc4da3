"""The node's NATS shell: connection options, the outbox publisher, status KV, RPC, triggers.

`Mesh` ties an agent (AgentAPI) and its event outbox (Outbox) to NATS. It never blocks the
agent: connecting and reconnecting run in the background, events wait in the outbox while
NATS is away, and each outbox entry is deleted only after JetStream acknowledged it (the
stream deduplicates re-sends by Nats-Msg-Id = event id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from reconciler.agent_api import AgentAPI, Outbox, OutboxEntry
from reconciler.bus_conn import (
    MeshError,
    NatsOptions,
    connect,
    no_jetstream,
    reason_of,
    redact_url,
)
from reconciler.bus_rpc import NodeEndpoints
from reconciler.events import iso_time
from reconciler.status import NodeStatus
from reconciler.subjects import (
    EVENTS_DEDUP_WINDOW_S,
    EVENTS_MAX_AGE_S,
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
    KV_BUCKET,
    KV_HISTORY,
)

__all__ = ["Mesh", "MeshError", "NatsOptions", "connect", "redact_url"]

log = logging.getLogger("reconciler.bus")

PUBLISH_BATCH = 512
ACK_TIMEOUT_S = 5.0
STATUS_DEBOUNCE_S = 0.15


class Mesh:
    """Runs beside an agent: publishes its outbox, writes its status, answers RPC."""

    def __init__(
        self,
        agent: AgentAPI,
        outbox: Outbox,
        options: NatsOptions,
        heartbeat: float = 10.0,
        *,
        batch: int = PUBLISH_BATCH,
        debounce: float = STATUS_DEBOUNCE_S,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.agent = agent
        self.outbox = outbox
        self.options = options
        self.heartbeat = heartbeat
        self.node = agent.node_id
        self._batch = batch
        self._debounce = debounce
        self._now = now
        self._nc: NATS | None = None
        self._kv: KeyValue | None = None
        self._js: JetStreamContext | None = None
        self.endpoints = NodeEndpoints(agent, self.snapshot)
        self._setup_done = False
        self._stream_ready = False
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._wake_publisher = asyncio.Event()
        self._status_dirty = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trouble: str | None = None  # last NATS problem logged (log once per change)
        self.published = 0  # events acknowledged by JetStream (for tests and benchmarks)
        self.nats_errors = 0  # connection errors seen (each retry counts; logged once)

    # ---- lifecycle -------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def ready(self) -> bool:
        """Connected, and RPC plus the trigger subscriptions are in place."""
        return self.connected and self._setup_done

    async def start(self) -> None:
        """Return at once; connect, set up and publish in the background."""
        self._loop = asyncio.get_running_loop()
        self.agent.add_listener(self._on_agent_change)
        self._tasks.append(asyncio.create_task(self._run(), name=f"mesh-{self.node}"))

    async def close(self, timeout: float = 5.0) -> None:
        """Publish what is pending (bounded), write a last status, and disconnect."""
        self._closing = True
        self._wake_publisher.set()
        self._status_dirty.set()
        loops = self._tasks[1:]  # publisher and status writer finish their last pass
        if loops:
            await asyncio.wait(loops, timeout=timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        nc, self._nc = self._nc, None
        if nc is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.endpoints.stop(), 1.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain() if nc.is_connected else nc.close(), timeout)
        if not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()

    def _on_agent_change(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake()
        else:  # the agent called from a worker thread
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._wake_publisher.set()
        self._status_dirty.set()

    async def _run(self) -> None:
        nc = NATS()
        self._nc = nc
        try:
            kwargs = self.options.connect_kwargs()
        except MeshError as exc:
            log.error("NATS disabled: %s", exc)
            return
        kwargs.setdefault("name", f"gitops-node {self.node}")
        kwargs.setdefault("inbox_prefix", f"_INBOX.{self.node}")
        # Endless background connect: the agent reconciles whether NATS is up or not.
        await nc.connect(
            **kwargs,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=2,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        self._set_trouble(None, f"NATS connected to {redact_url(nc.connected_url.geturl())}"
                          if nc.connected_url else "NATS connected")
        while True:  # a connection lost during setup: retry once it is back
            try:
                await self.endpoints.start(nc)
                self._setup_done = True
                break
            except (TimeoutError, nats.errors.Error) as exc:
                self._set_trouble(f"NATS setup (RPC service, subscriptions) failed: "
                                  f"{reason_of(exc)} (retrying)")
                await self.endpoints.stop()
                await asyncio.sleep(1.0)
        self._wake()  # first status write and outbox drain right away
        self._tasks.append(asyncio.create_task(self._publisher(), name=f"pub-{self.node}"))
        self._tasks.append(asyncio.create_task(self._status_writer(), name=f"kv-{self.node}"))

    def _set_trouble(self, trouble: str | None, ok_message: str = "") -> None:
        """Log NATS problems once per state change, not once per retry."""
        if trouble == self._trouble:
            return
        if trouble is None:
            log.info("%s", ok_message or "NATS ok again")
        else:
            log.warning("%s", trouble)
        self._trouble = trouble

    def _why(self, exc: BaseException) -> str:
        """The reason of a JetStream failure, with a hint when no JetStream answered at all."""
        if not isinstance(exc, nats.js.errors.ServiceUnavailableError):
            return reason_of(exc)
        return no_jetstream(self.options.js_domain)

    async def _on_error(self, exc: Exception) -> None:
        self.nats_errors += 1
        self._set_trouble(f"NATS at {self.options.describe()}: {reason_of(exc)} (retrying)")

    async def _on_disconnected(self) -> None:
        if not self._closing:
            self._set_trouble("NATS disconnected; events wait in the outbox (reconnecting)")

    async def _on_reconnected(self) -> None:
        self._set_trouble(None, "NATS reconnected")
        self._wake()

    # ---- status KV ----------------------------------------------------------------------
    def snapshot(self) -> NodeStatus:
        """The agent's status plus what only the mesh knows (outbox, heartbeat, write time)."""
        status = self.agent.status()
        backlog, dropped = self.outbox.outbox_stats()
        return status.model_copy(
            update={
                "outbox_backlog": backlog,
                "outbox_dropped": dropped,
                "heartbeat_interval_s": self.heartbeat,
                "updated_at": iso_time(self._now()),
            }
        )

    async def _ensure_kv(self, nc: NATS) -> KeyValue:
        if self._kv is None:
            js = self._jetstream(nc)
            try:
                self._kv = await js.key_value(KV_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await js.create_key_value(
                    bucket=KV_BUCKET, history=KV_HISTORY, description="gitops-mesh node status"
                )
        return self._kv

    async def write_status(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return
        try:
            await self._ensure_kv(nc)
            # not kv.put: that subject does not cross a leaf connection (see kv_put_subject)
            subject = self.options.kv_put_subject(KV_BUCKET, self.node)
            await self._jetstream(nc).publish(subject, self.snapshot().to_json_bytes())
        except (TimeoutError, nats.errors.Error) as exc:
            self._kv = None  # look the bucket up again (it may have been deleted)
            if not self._closing:
                self._set_trouble(f"status KV write failed: {self._why(exc)} (will retry)")

    async def _status_writer(self) -> None:
        """Write on change and as a heartbeat. A change after a quiet spell is written at once
        (push-to-synced latency); a burst is coalesced to one write per `debounce`."""
        last_write = -self._debounce
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_dirty.wait(), self.heartbeat)
            loop = asyncio.get_running_loop()
            since = loop.time() - last_write
            if self._status_dirty.is_set() and not self._closing and since < self._debounce:
                await asyncio.sleep(self._debounce - since)
            self._status_dirty.clear()
            last_write = loop.time()
            try:
                await self.write_status()
            except Exception as exc:  # the agent's status() failed: keep the loop alive
                self._set_trouble(f"status snapshot failed: {type(exc).__name__}: {exc}")
            if self._closing:
                return

    # ---- events: outbox -> JetStream ---------------------------------------------------
    def _jetstream(self, nc: NATS) -> JetStreamContext:
        """One context per connection: each one opens its own publish_async reply inbox."""
        if self._js is None:
            self._js = self.options.jetstream(nc)
        return self._js

    async def _ensure_stream(self, nc: NATS) -> None:
        js = self._jetstream(nc)
        try:
            await js.stream_info(EVENTS_STREAM)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(
                    StreamConfig(
                        name=EVENTS_STREAM,
                        subjects=[EVENTS_SUBJECTS],
                        max_age=EVENTS_MAX_AGE_S,
                        duplicate_window=EVENTS_DEDUP_WINDOW_S,
                        storage=StorageType.FILE,
                        description="gitops-mesh events",
                    )
                )
            except nats.js.errors.BadRequestError:
                await js.stream_info(EVENTS_STREAM)  # another node created it meanwhile
        self._stream_ready = True

    async def _publisher(self) -> None:
        backoff = 0.2
        while True:
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_publisher.wait(), 1.0)
            self._wake_publisher.clear()
            try:
                drained = await self.publish_pending()
            except Exception as exc:  # the outbox (sqlite) failed: keep the loop alive
                self._set_trouble(f"reading the outbox failed: {type(exc).__name__}: {exc}")
                drained = False
            if self._closing:
                return
            if drained:
                backoff = 0.2
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def publish_pending(self) -> bool:
        """Publish the outbox until it is empty; False if NATS failed on the way."""
        nc = self._nc
        while nc is not None and nc.is_connected:
            batch = self.outbox.outbox_batch(self._batch)
            if not batch:
                return True
            if not await self._publish_batch(nc, batch):
                return False
        return False

    async def _publish_batch(self, nc: NATS, batch: list[OutboxEntry]) -> bool:
        """Pipeline a batch (all in flight, then wait for acks); delete only what was acked."""
        try:
            if not self._stream_ready:
                await self._ensure_stream(nc)
            js = self._jetstream(nc)
            futures = [
                await js.publish_async(
                    entry.subject, entry.payload, headers={"Nats-Msg-Id": entry.event_id}
                )
                for entry in batch
            ]
        except (TimeoutError, nats.errors.Error) as exc:
            self._set_trouble(f"publishing events failed: {self._why(exc)} (will retry)")
            return False
        done, pending = await asyncio.wait(futures, timeout=ACK_TIMEOUT_S)
        for fut in pending:
            fut.cancel()
        acked: list[int] = []
        failure: BaseException | None = None
        for entry, fut in zip(batch, futures, strict=True):
            if fut in done and fut.exception() is None:
                acked.append(entry.seq)
            elif failure is None:
                failure = fut.exception() if fut in done else TimeoutError("no JetStream ack")
        if acked:
            self.outbox.outbox_ack(acked)
            self.published += len(acked)
            self._status_dirty.set()  # the backlog in the status changed
        if failure is not None:
            if isinstance(failure, nats.js.errors.NoStreamResponseError):
                self._stream_ready = False  # the stream is gone: create it again
            self._set_trouble(f"publishing events failed: {reason_of(failure)} (will retry)")
            return False
        if self._trouble and self._trouble.startswith("publishing"):
            self._set_trouble(None, "publishing events again")
        return True
