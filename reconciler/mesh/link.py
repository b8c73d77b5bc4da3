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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from reconciler.core.events import iso_time
from reconciler.core.ports import AgentAPI, Outbox, OutboxEntry
from reconciler.core.redact import redact_server
from reconciler.core.status import NodeStatus, fit_status
from reconciler.mesh.client import no_jetstream_here
from reconciler.mesh.conn import (
    MeshError,
    NatsOptions,
    connect,
    no_jetstream,
    reason_of,
)
from reconciler.mesh.provision import NotProvisioned, Wanted, ensure, events_stream, nodes_bucket
from reconciler.mesh.rollouts import MeshCoordinator
from reconciler.mesh.service import NodeEndpoints
from reconciler.mesh.subjects import KV_BUCKET

__all__ = ["Mesh", "MeshError", "NatsOptions", "connect"]

log = logging.getLogger("reconciler.mesh.link")

PUBLISH_BATCH = 512
# A publish whose stream leader just died gets no ack: give up on it soon and send again
# (the stream drops the duplicate by Nats-Msg-Id), so events flow right after an election.
ACK_TIMEOUT_S = 1.0
RETRY_MIN_S, RETRY_MAX_S = 0.1, 1.0
# After a failed publish one event goes alone (a probe) until JetStream acks it again: while
# a stream elects its leader every publish is refused at once ("no responders"), so probing
# every quarter second costs the servers one message, not a batch, and finds the new leader
# within 0.25 s of its election.
PROBE_RETRY_MAX_S = 0.25
PROBE_ACK_TIMEOUT_S = 0.5
# The Mesh's JetStream API requests (stream and bucket checks): one sent while a stream elects
# its leader is never answered, however long one waits (nats-py's default is 5 s).
API_TIMEOUT_S = 2.0
STATUS_WRITE_TIMEOUT_S = 2.0


@dataclass
class Flight:
    """A batch of outbox entries on the wire and their JetStream ack futures (same order)."""

    batch: list[OutboxEntry]
    futures: list[asyncio.Future[Any]]


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
        debounce: float = 0.15,
        ack_timeout: float = ACK_TIMEOUT_S,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.agent = agent
        self.outbox = outbox
        self.options = options
        self.heartbeat = heartbeat
        self.node = agent.node_id
        self._batch = batch
        self._debounce = debounce
        self._ack_timeout = ack_timeout
        self._now = now
        self._nc: NATS | None = None
        self._kv: KeyValue | None = None
        self._js: JetStreamContext | None = None
        self.endpoints = NodeEndpoints(agent, self.snapshot)
        # the agent's RolloutCoordinator (the composition root hands it to the agent)
        self.coordinator = MeshCoordinator(lambda: self._nc if self._setup_done else None,
                                           options, now=now)
        self._setup_done = False
        self._stream_ready = False
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._wake_publisher = asyncio.Event()
        self._status_dirty = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trouble: str | None = None  # last NATS problem logged (log once per change)
        # what verification found wrong with the stream / bucket, by label (status message)
        self.problems: dict[str, str] = {}
        self._acks_timed_out = False  # the last batch got no acks in time (a leader change)
        self._probing = False  # the last publish failed: send one event until one is acked
        self._stream_check: asyncio.Task[None] | None = None  # after "no responders"
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
        await self.coordinator.close()
        self._wake_publisher.set()
        self._status_dirty.set()
        loops = self._tasks[1:]  # publisher and status writer finish their last pass
        if loops:
            await asyncio.wait(loops, timeout=timeout)
        if self._stream_check is not None:
            self._tasks.append(self._stream_check)
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
            reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py takes a float
            connect_timeout=2,
            # a server that dies without closing its sockets is noticed within ~10 s
            ping_interval=5,
            max_outstanding_pings=2,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        self._set_trouble(None, f"NATS connected to {redact_server(nc.connected_url.geturl())}"
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
        if not no_jetstream_here(exc):
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
        """The agent's status as written now, with the heartbeat this mesh keeps and what
        it found wrong with the stream or bucket (message and mesh_problems)."""
        status = self.agent.status()
        update: dict[str, object] = {
            "heartbeat_interval_s": self.heartbeat, "updated_at": iso_time(self._now())}
        if self.problems:
            problems = sorted(self.problems.values())
            update["mesh_problems"] = problems
            update["message"] = "; ".join(p for p in (status.message, *problems) if p)
        return status.model_copy(update=update)

    async def _verify(self, nc: NATS, wanted: Wanted) -> bool:
        """Check (dev mode: create) what we use; False if it is missing and we may not
        create it. A mismatch is logged by `ensure` and shown in our status message."""
        try:
            finding = await ensure(self._jetstream(nc), wanted)
        except NotProvisioned as exc:
            self.problems[wanted.label] = str(exc)
            self._set_trouble(str(exc))
            return False
        if finding.state == "differs":
            self.problems[wanted.label] = finding.describe() + " (fix: gitops-mesh nats-init)"
        else:
            self.problems.pop(wanted.label, None)
        return True

    async def _ensure_kv(self, nc: NATS) -> KeyValue | None:
        if self._kv is None and await self._verify(nc, nodes_bucket()):
            self._kv = await self._jetstream(nc).key_value(KV_BUCKET)
        return self._kv

    async def write_status(self) -> bool:
        """One status write; False if it failed (the writer retries soon)."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return False
        try:
            if await self._ensure_kv(nc) is None:
                return False
            # not kv.put: that subject does not cross a leaf connection (see kv_put_subject)
            subject = self.options.kv_put_subject(KV_BUCKET, self.node)
            # fits one message whatever the node runs (the server's max_payload, less room
            # for headers): an unwritten status would read as an unreachable node
            status = fit_status(self.snapshot(), max(nc.max_payload - 4096, 4096))
            await self._jetstream(nc).publish(subject, status.to_json_bytes(),
                                              timeout=STATUS_WRITE_TIMEOUT_S)
        except (TimeoutError, nats.errors.Error) as exc:
            if isinstance(exc, nats.js.errors.NotFoundError | nats.js.errors.NoStreamResponseError):
                self._kv = None  # look the bucket up again (it may have been deleted)
            if not self._closing:
                self._set_trouble(f"status KV write failed: {self._why(exc)} (will retry)")
            return False
        if self._trouble and self._trouble.startswith("status KV"):
            self._set_trouble(None, "status KV writes again")
        return True

    async def _status_writer(self) -> None:
        """Write on change and as a heartbeat. A change after a quiet spell is written at once
        (push-to-synced latency); a burst is coalesced to one write per `debounce`. A failed
        write is retried with a short backoff (a failover), not at the next heartbeat."""
        last_write = -self._debounce
        retry = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_dirty.wait(), retry or self.heartbeat)
            loop = asyncio.get_running_loop()
            since = loop.time() - last_write
            if self._status_dirty.is_set() and not self._closing and since < self._debounce:
                await asyncio.sleep(self._debounce - since)
            self._status_dirty.clear()
            last_write = loop.time()
            try:
                written = await self.write_status()
            except Exception as exc:  # the agent's status() failed: keep the loop alive
                self._set_trouble(f"status snapshot failed: {type(exc).__name__}: {exc}")
                written = True  # nothing NATS can fix: back to the heartbeat
            if self._closing:
                return
            retry = 0.0 if written else min(max(retry * 2, RETRY_MIN_S * 2), RETRY_MAX_S * 2)

    # ---- events: outbox -> JetStream ---------------------------------------------------
    def _jetstream(self, nc: NATS) -> JetStreamContext:
        """One context per connection: each one opens its own publish_async reply inbox."""
        if self._js is None:
            self._js = self.options.jetstream(nc, API_TIMEOUT_S)
        return self._js

    async def _publisher(self) -> None:
        backoff = RETRY_MIN_S
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
                backoff = RETRY_MIN_S
            elif self._acks_timed_out:
                # the wait for acks paced this attempt already: send again at once, so the
                # events flow within one ack timeout of a new stream leader's election
                self._acks_timed_out = False
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, PROBE_RETRY_MAX_S if self._probing else RETRY_MAX_S)

    async def publish_pending(self) -> bool:
        """Publish the outbox until it is empty; False if NATS failed on the way.

        Two batches overlap: the next one is read and sent before the acks of the one in
        flight are awaited, so the sqlite work (the read, and the delete of what was acked:
        a synchronous commit) runs while a batch is on the wire instead of between batches.
        After a failure (probing) one event goes at a time, with nothing else in flight."""
        nc = self._nc
        flight: Flight | None = None
        while nc is not None and nc.is_connected:
            limit = 1 if self._probing else self._batch
            # the rows in flight are still in the outbox (deleted once acked): skip them
            batch = self.outbox.outbox_batch(limit, flight.batch[-1].seq if flight else 0)
            held = flight is not None and self._probing  # a probe goes alone
            sent = await self._send(nc, batch) if batch and not held else None
            if flight is not None and not await self._settle(nc, flight):
                if sent is not None:
                    for fut in sent.futures:  # re-sent later (the stream drops duplicates)
                        fut.cancel()
                return False
            if not batch:
                return True
            if sent is None and not held:
                return False  # the send failed
            flight = sent  # None when a probe was held back: read again
        if flight is not None:
            for fut in flight.futures:
                fut.cancel()
        return False

    async def _send(self, nc: NATS, batch: list[OutboxEntry]) -> Flight | None:
        """Put a batch on the wire (all in flight); None if that failed."""
        try:
            if not self._stream_ready:
                self._stream_ready = await self._verify(nc, events_stream())
                if not self._stream_ready:
                    return None
            js = self._jetstream(nc)
            return Flight(batch, [
                await js.publish_async(
                    entry.subject, entry.payload, headers={"Nats-Msg-Id": entry.event_id}
                )
                for entry in batch
            ])
        except (TimeoutError, nats.errors.Error) as exc:
            self._set_trouble(f"publishing events failed: {self._why(exc)} (will retry)")
            return None

    async def _settle(self, nc: NATS, flight: Flight) -> bool:
        """Wait for a batch's acks; delete only what was acked. False if any failed."""
        done, pending = await asyncio.wait(flight.futures, timeout=min(
            self._ack_timeout, PROBE_ACK_TIMEOUT_S) if self._probing else self._ack_timeout)
        for fut in pending:
            fut.cancel()
        self._acks_timed_out = bool(pending)
        acked: list[int] = []
        failure: BaseException | None = None
        for entry, fut in zip(flight.batch, flight.futures, strict=True):
            if fut in done and fut.exception() is None:
                acked.append(entry.seq)
            elif failure is None:
                failure = fut.exception() if fut in done else TimeoutError("no JetStream ack")
        if acked:
            self.outbox.outbox_ack(acked)
            self.published += len(acked)
            self._status_dirty.set()  # the backlog in the status changed
        self._probing = failure is not None
        if failure is not None:
            if isinstance(failure, nats.js.errors.NoStreamResponseError):
                self._check_stream(nc)
            self._set_trouble(f"publishing events failed: {reason_of(failure)} (will retry)")
            return False
        if self._trouble and self._trouble.startswith("publishing"):
            self._set_trouble(None, "publishing events again")
        return True

    def _check_stream(self, nc: NATS) -> None:
        """Publishes met "no responders": the stream is electing a leader (a cluster's
        failover) or was deleted (then it is created again, in dev mode). Find out beside the
        publisher, not in its way: a check sent during an election is never answered, and
        waiting for it kept events stuck for its whole timeout after the new leader was up."""
        if self._stream_check is None or self._stream_check.done():
            self._stream_check = asyncio.create_task(self._recheck_stream(nc),
                                                     name=f"stream-check-{self.node}")

    async def _recheck_stream(self, nc: NATS) -> None:
        with contextlib.suppress(TimeoutError, nats.errors.Error):  # electing: publishes tell
            await self._verify(nc, events_stream())
