"""KV last values by batch direct get (reconciler.mesh.direct), and `wait` deciding from them
when it cannot make a consumer (as while a stream or meta leader is electing), against a
real nats-server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from conftest import NatsServer, start_nats

from reconciler.core.status import NodeStatus
from reconciler.mesh import provision
from reconciler.mesh.direct import MAX_SUBJECTS, direct_last_values
from reconciler.mesh.subjects import KV_BUCKET

REV = "c" * 40
# a reader that may read the status bucket by direct get but make no consumer at all: what
# a cluster electing a leader gives every client for a few seconds
CONFIG = """
authorization {
  users: [
    {user: admin, password: admin}
    {user: reader, password: reader, permissions: {
      publish: {allow: ["$JS.API.INFO", "$JS.API.STREAM.INFO.KV_gitops_nodes",
                        "$JS.API.DIRECT.GET.KV_gitops_nodes"]}
      subscribe: {allow: ["_INBOX.>"]}
    }}
  ]
}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = start_nats(tmp_path_factory.mktemp("nats-direct"), CONFIG)
    yield server
    server.stop()


def admin_url(server: NatsServer) -> str:
    return f"nats://admin:admin@127.0.0.1:{server.port}"


async def put_statuses(server: NatsServer, statuses: dict[str, tuple[str, str]]) -> None:
    """(revision, status) by node, into gitops_nodes as made by nats-init."""
    nc = await nats.connect(admin_url(server))
    try:
        js = nc.jetstream()
        await provision.ensure(js, provision.nodes_bucket())
        kv = await js.key_value(KV_BUCKET)
        for node, (revision, state) in statuses.items():
            await kv.put(node, NodeStatus(node=node, revision=revision, status=state,
                                          labels={"ring": "canary" if node == "n1" else "b"},
                                          updated_at=datetime.now(UTC).isoformat(),
                                          ).to_json_bytes())
    finally:
        await nc.close()


async def test_last_values_by_key_and_of_every_key_deletes_included(server: NatsServer) -> None:
    await put_statuses(server, {"d1": (REV, "synced"), "d2": (REV, "synced")})
    nc = await nats.connect(admin_url(server))
    try:
        kv = await nc.jetstream().key_value(KV_BUCKET)
        await kv.put("d2", b'{"second": true}')
        await kv.delete("d1")
        everything = await direct_last_values(nc, KV_BUCKET)
        assert everything is not None
        assert everything["d2"].value == b'{"second": true}' and everything["d1"].value is None
        assert everything["d2"].created is not None
        keyed = await direct_last_values(nc, KV_BUCKET, ["d2", "nobody"])
        assert keyed is not None and set(keyed) == {"d2"}
        # no such bucket: no replica answers, which is "no direct answer", not an error
        assert await direct_last_values(nc, "no_such_bucket", timeout=0.5) is None
    finally:
        await nc.close()


async def test_more_keys_than_one_request_may_match_are_asked_for_in_chunks(
        tmp_path: Path) -> None:
    server = start_nats(tmp_path)
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await provision.ensure(js, provision.nodes_bucket())
        many = [f"m{i}" for i in range(MAX_SUBJECTS + 200)]
        await asyncio.gather(*(js.publish(f"$KV.{KV_BUCKET}.{k}", k.encode()) for k in many))
        # every key at once matches too many subjects: the server refuses, we say so
        assert await direct_last_values(nc, KV_BUCKET) is None
        keyed = await direct_last_values(nc, KV_BUCKET, many)
        assert keyed is not None and {k: e.value for k, e in keyed.items()} == {
            k: k.encode() for k in many}
        await nc.close()
    finally:
        server.stop()


def reader(server: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args, "--nats", server.url, "--nats-user",
         "reader", "--nats-password", "reader"], capture_output=True, text=True, timeout=60)


def wait(server: NatsServer, *args: str) -> subprocess.CompletedProcess[str]:
    return reader(server, "wait", "--revision", REV, "--timeout", "4s", *args)


async def test_wait_and_status_decide_without_any_consumer(server: NatsServer) -> None:
    await put_statuses(server, {"n1": (REV, "synced"), "n2": (REV, "synced"),
                                "n3": ("d" * 40, "failed")})
    by_node = await asyncio.to_thread(wait, server, "--node", "n1", "--node", "n2")
    assert by_node.returncode == 0, by_node.stderr
    assert by_node.stdout.startswith(f"{REV[:12]}: synced on 2 node(s): n1, n2")
    by_label = await asyncio.to_thread(wait, server, "--selector", "ring=canary")
    assert by_label.returncode == 0, by_label.stderr
    await put_statuses(server, {"n2": (REV, "failed")})
    failed = await asyncio.to_thread(wait, server, "--node", "n1", "--node", "n2")
    assert failed.returncode == 1 and "n2: failed at" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr
    status = await asyncio.to_thread(reader, server, "status", "--json")
    assert status.returncode == 0, status.stderr
    shown = {s["node"]: (s["revision"], s["status"]) for s in json.loads(status.stdout)}
    assert {n: shown[n] for n in ("n1", "n2")} == {"n1": (REV, "synced"), "n2": (REV, "failed")}
