"""KV last values by batch direct get: any replica of the bucket's stream answers, so a read
needs neither the stream's leader nor the meta leader, which may both be electing for
seconds after a server dies (an ordered consumer cannot be made meanwhile: `wait` saw
nothing for 5-6 s in a third of the cluster trials).

One request, `{"multi_last": [subjects], "batch": n}` to `$JS.API.DIRECT.GET.<stream>`
(nats-server 2.11+, stream `allow_direct`, as nats-init makes the buckets); the replies
end with a 204 status. The server refuses (413) a request matching more than
MAX_SUBJECTS subjects: callers that know their keys ask for those, in chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from reconciler.core.events import parse_time
from reconciler.mesh.client import FOLLOW_API_TIMEOUT_S, TRANSIENT, KvEntry
from reconciler.mesh.conn import js_api_prefix

MAX_SUBJECTS = 1024  # matching subjects per multi_last request (the server's limit)
_END = "204"  # end of batch
_NONE = "404"  # nothing matched


async def direct_last_values(nc: NATS, bucket: str, keys: Sequence[str] | None = None,
                             js_domain: str | None = None,
                             timeout: float = FOLLOW_API_TIMEOUT_S) -> dict[str, KvEntry] | None:
    """The last entry of each of `keys` of `bucket` (None: of every key; a deleted key's
    value is None), or None when no direct answer came: the stream does not allow direct
    gets, the server predates batch gets, too many keys match, or no replica answered
    within `timeout` (each request's bound)."""
    prefix = f"$KV.{bucket}."
    if keys is None:
        batches: list[list[str]] = [[f"{prefix}>"]]
    else:
        wanted = sorted(set(keys))
        batches = [[prefix + k for k in wanted[i:i + MAX_SUBJECTS]]
                   for i in range(0, len(wanted), MAX_SUBJECTS)]
    found: dict[str, KvEntry] = {}
    for subjects in batches:
        got = await _multi_last(nc, f"{js_api_prefix(js_domain)}.DIRECT.GET.KV_{bucket}",
                                subjects, prefix, timeout)
        if got is None:
            return None
        found.update(got)
    return found


async def _multi_last(nc: NATS, api: str, subjects: list[str], prefix: str, timeout: float
                      ) -> dict[str, KvEntry] | None:
    replies: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_reply(msg: Msg) -> None:
        replies.put_nowait(msg)

    body = json.dumps({"multi_last": subjects, "batch": MAX_SUBJECTS}).encode()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    found: dict[str, KvEntry] = {}
    try:
        sub = await nc.subscribe(nc.new_inbox(), cb=on_reply)
    except nats.errors.Error:
        return None
    try:
        await nc.publish(api, body, reply=sub.subject)
        # at most one reply per subject and the end: a misbehaving answer cannot run on
        for _ in range(MAX_SUBJECTS + 1):
            msg = await asyncio.wait_for(replies.get(), max(0.0, deadline - loop.time()))
            headers = msg.headers or {}
            status = headers.get("Status")
            if status:
                return found if status in (_END, _NONE) else None
            subject = headers.get("Nats-Subject", "")
            if not subject.startswith(prefix):
                return None
            key = subject[len(prefix):]
            deleted = headers.get("KV-Operation") in ("DEL", "PURGE") or not msg.data
            found[key] = KvEntry(key, None if deleted else msg.data,
                                 parse_time(headers.get("Nats-Time-Stamp")))
        return None
    except (*TRANSIENT, nats.errors.Error):
        return None
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
