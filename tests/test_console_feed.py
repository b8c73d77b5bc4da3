"""console.feed: the stream position read from a delivery's reply subject is nats-py's."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from console.feed import stream_position

REPLIES = [
    "$JS.ACK.GITOPS_EVENTS.c1.1.4212.4212.1764590000123456789.95788",  # v1 (9 tokens)
    "$JS.ACK.hub.ACCHASH.GITOPS_EVENTS.c1.2.7.6.1764590000123456789.0",  # v2, no random
    "$JS.ACK._.ACCHASH.GITOPS_EVENTS.c1.1.99.98.1764590000123456789.3.r4nd",  # v2
]


@pytest.mark.parametrize("reply", REPLIES)
def test_stream_position_is_what_nats_py_metadata_says(reply: str) -> None:
    msg = Msg(None, subject="gitops.events.n1.app.deployed", reply=reply)  # type: ignore[arg-type]
    meta = Msg(None, reply=reply).metadata  # type: ignore[arg-type]
    assert stream_position(msg) == (meta.sequence.stream, meta.num_pending)


def test_a_message_that_is_not_a_jetstream_delivery_is_refused_like_nats_py_does() -> None:
    with pytest.raises(NotJSMessageError):
        stream_position(Msg(None, reply="_INBOX.abc"))  # type: ignore[arg-type]
