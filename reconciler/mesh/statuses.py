"""The status bucket as a long-lived reader (`wait`) sees it across failovers: a live follow
(KvFollower), made in the background, and direct reads of any replica until it is there.

After a server dies, a new consumer cannot be made while the bucket's stream or the
JetStream meta leader is electing (4-9 s), but any surviving replica answers a direct get:
so a reader starting, or re-making its follow after a reconnect, still sees every status
written meanwhile within DIRECT_EVERY_S.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from reconciler.mesh.client import (
    FOLLOW_API_TIMEOUT_S,
    TRANSIENT,
    KvEntry,
    KvFollower,
    open_bucket,
)
from reconciler.mesh.conn import MeshError, no_jetstream, reason_of
from reconciler.mesh.direct import direct_last_values
from reconciler.mesh.subjects import KV_BUCKET

DIRECT_EVERY_S = 0.25  # replicas read this often while there is no follow


class LiveStatuses:
    """The latest entry of every key of gitops_nodes, as `read` gives them."""

    def __init__(self, nc: NATS, js_domain: str | None = None) -> None:
        self._nc, self._js_domain = nc, js_domain
        self._follower: KvFollower | None = None
        self._making: asyncio.Task[KvFollower | None] | None = None
        self._seen: dict[str, KvEntry] | None = None  # of the last direct read
        self.trouble: str | None = None  # why there is no follow (for a timeout message)

    async def read(self, keys: list[str] | None, left: float) -> dict[str, KvEntry] | None:
        """The follow's entries once it caught up; without a follow, those of a direct read
        of `keys` (None: every key), or of the last one that answered; None while nothing
        was read. `left`: the caller's time left (bounds the follow being made). Raises
        MeshError when the server has no JetStream at all (waiting is futile)."""
        if self._follower is not None:
            self._follower.changed.clear()
            return self.latest
        if self._making is None:
            self._making = asyncio.create_task(follow_statuses(self._nc, self._js_domain, left),
                                               name="statuses-follow")
        elif self._making.done():
            self._take_made()
            if self._follower is not None:
                return self.latest
        self._seen = await direct_last_values(self._nc, KV_BUCKET, keys,
                                              self._js_domain) or self._seen
        return self._seen

    @property
    def latest(self) -> dict[str, KvEntry] | None:
        """What `read` gave last, reading nothing: the follow's entries once it caught up,
        else the last direct read's."""
        follower = self._follower
        if follower is not None and follower.caught_up.is_set():
            return follower.entries
        return self._seen

    async def news(self, *events: asyncio.Event | None, timeout: float) -> None:
        """Until something may have changed: with a follow, an update or one of `events`
        (at most `timeout`); without, the follow made or the next direct read due."""
        if self._follower is None:
            if self._making is not None:
                await asyncio.wait({self._making}, timeout=min(DIRECT_EVERY_S, timeout))
            return
        waits = [asyncio.ensure_future(e.wait())
                 for e in (self._follower.changed, *events) if e is not None]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def restart(self) -> None:
        """The connection moved to another server: follow afresh (the old consumer died with
        its server; nats-py would notice only after missed heartbeats)."""
        follower, self._follower = self._follower, None
        if follower is not None:
            if follower.caught_up.is_set():
                self._seen = dict(follower.entries)  # the freshest view until a read answers
            await follower.stop()

    async def close(self) -> None:
        making, self._making = self._making, None
        if making is not None:
            making.cancel()  # follow_statuses stops what it made; one made just now is stopped here
            await asyncio.wait({making}, timeout=1.0)
            if making.done() and not making.cancelled() and making.exception() is None:
                late = making.result()
                if late is not None:
                    await late.stop()
        await self.restart()

    def _take_made(self) -> None:
        made, self._making = self._making, None
        assert made is not None
        try:
            self._follower = made.result()
        except MeshError as exc:
            if str(exc) == no_jetstream(self._js_domain):
                raise
            self.trouble = str(exc)
        except (*TRANSIENT, nats.errors.Error, nats.js.errors.NotFoundError) as exc:
            self.trouble = reason_of(exc)
        if self._follower is not None:
            self.trouble = None


async def follow_statuses(nc: NATS, js_domain: str | None, timeout: float
                          ) -> KvFollower | None:
    """A follower of the status bucket, None while the bucket does not exist yet."""
    if await open_bucket(nc, KV_BUCKET, js_domain, FOLLOW_API_TIMEOUT_S) is None:
        return None
    follower = KvFollower(nc, KV_BUCKET, js_domain)
    try:
        await asyncio.wait_for(follower.start(), timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            await follower.stop()
        raise
    return follower
