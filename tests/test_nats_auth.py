"""`nats-config` output loaded by a real nats-server: each identity can do its job and no more."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
from conftest import NatsServer, eventually_async, make_spec_repo, start_nats
from fake_agent import FakeAgent
from nats.aio.client import Client as NATS

import reconciler
from reconciler.cli.mesh_cmds import fleet_reconcile
from reconciler.core.status import NodeStatus
from reconciler.mesh.link import Mesh, MeshError, NatsOptions, connect
from reconciler.mesh.permissions import NatsConfigError, write_config
from reconciler.node.store import Store


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Path]]:
    root = tmp_path_factory.mktemp("auth")
    out = root / "auth"
    done = subprocess.run(
        [sys.executable, "-m", "reconciler", "nats-config", "--node", "n1", "--node", "n2",
         "--out", str(out)], capture_output=True, text=True, check=True,
    )
    assert sorted(Path(p).name for p in done.stdout.split()) == sorted(
        ["auth.conf", *(f"{i}.{ext}" for i in ("n1", "n2", "console", "observer", "notifier",
                                                "admin") for ext in ("nk", "env"))]
    )
    server = start_nats(root, 'include "auth/auth.conf"\n')
    nats_init(server, out)
    yield server, out
    server.stop()


def nats_init(server: NatsServer, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`gitops-mesh nats-init` with the admin identity nats-config wrote."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GITOPS_MESH_")}
    env.update(line.split("=", 1) for line in (out / "admin.env").read_text().splitlines())
    done = subprocess.run(
        [sys.executable, "-m", "reconciler", "nats-init", "--nats", server.url, *args],
        capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


class Client:
    """A connection as one identity, collecting the server's permission errors."""

    def __init__(self, nc: NATS, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    async def violation(self, what: str) -> None:
        await self.nc.flush()
        await eventually_async(
            lambda: _async(any("permissions violation" in e.lower() and what.lower() in e.lower()
                               for e in self.errors)),
            timeout=5, what=f"a permissions violation for {what}",
        )


async def _async(value: object) -> object:
    return value


@pytest.fixture
async def as_identity(secured: tuple[NatsServer, Path]) -> AsyncIterator[object]:
    server, out = secured
    clients: list[Client] = []

    async def make(identity: str) -> Client:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        opts = NatsOptions(servers=[server.url], nkey_seed_file=str(out / f"{identity}.nk"),
                           inbox_prefix=f"_INBOX.{identity}")
        client = Client(await connect(opts, error_cb=on_error), errors)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.nc.close()


def test_credential_files_are_private(secured: tuple[NatsServer, Path]) -> None:
    _server, out = secured
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert (out / "n1.env").read_text() == f"GITOPS_MESH_NATS_NKEY={(out / 'n1.nk').resolve()}\n"


async def test_a_node_works_end_to_end_but_cannot_touch_another_node(
    secured: tuple[NatsServer, Path], as_identity: object, tmp_path: Path
) -> None:
    server, out = secured
    store = Store(tmp_path / "n1")
    agent = FakeAgent(store, "n1", {"role": "edge"})
    agent.record("app.deployed", app="web", version="1")
    mesh = Mesh(agent, store, NatsOptions(servers=[server.url],
                                          nkey_seed_file=str(out / "n1.nk")))
    await mesh.start()
    make = as_identity
    console = await make("console")  # type: ignore[operator]
    observer = await make("observer")  # type: ignore[operator]
    try:
        # n1's own path: stream + KV created and written, RPC answered, fleet trigger heard
        await eventually_async(lambda: _async(store.outbox_stats()[0] == 0 and mesh.ready),
                               what="n1 published with its own identity")
        js = observer.nc.jetstream()

        async def n1_status() -> object:
            try:
                return await (await js.key_value("gitops_nodes")).get("n1")
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
                return None

        status = await eventually_async(n1_status)
        kv = await js.key_value("gitops_nodes")
        assert NodeStatus.from_json(status.value).node == "n1"  # type: ignore[attr-defined]
        info = await js.stream_info("GITOPS_EVENTS")
        assert info.state.messages == 1
        reply = await console.nc.request("gitops.rpc.n1.reconcile", b"", timeout=5)
        assert json.loads(reply.data)["node"] == "n1"
        replies = await fleet_reconcile(console.nc, None, timeout=5)
        assert [r["node"] for r in replies] == ["n1"]
        assert agent.triggers == ["rpc", "fleet"]

        # n1's credentials used for someone else's business
        n1 = await make("n1")  # type: ignore[operator]
        await n1.nc.publish("gitops.events.n2.app.deployed", b"{}")
        await n1.violation("gitops.events.n2.app.deployed")
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await n1.nc.jetstream().publish("$KV.gitops_nodes.n2", b"{}", timeout=1)
        await n1.violation("$KV.gitops_nodes.n2")
        await n1.nc.subscribe("gitops.rpc.n2.status")
        await n1.violation("gitops.rpc.n2.status")
        await n1.nc.publish("gitops.rpc.n1.reconcile", b"")  # not even its own RPC as a caller
        await n1.violation("gitops.rpc.n1.reconcile")
        await n1.nc.publish("gitops.fleet.reconcile", b"")
        await n1.violation("gitops.fleet.reconcile")
        await n1.nc.publish("$JS.API.STREAM.DELETE.GITOPS_EVENTS", b"")
        await n1.violation("$JS.API.STREAM.DELETE.GITOPS_EVENTS")
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get("n2")  # nothing reached the bucket
        info = await js.stream_info("GITOPS_EVENTS", subjects_filter="gitops.events.n2.>")
        assert not info.state.subjects
    finally:
        await mesh.close()
        store.close()


@pytest.mark.parametrize("identity", ["n1", "console", "observer", "notifier"])
async def test_only_the_admin_may_create_alter_or_delete_streams(
    secured: tuple[NatsServer, Path], as_identity: object, identity: str
) -> None:
    from reconciler.mesh.provision import events_stream, nodes_bucket

    client = await as_identity(identity)  # type: ignore[operator]
    js = client.nc.jetstream(timeout=0.3)
    hostile = events_stream().config
    hostile.subjects = ["gitops.events.>", "gitops.rpc.>"]
    hostile.max_msgs = 3
    for attempt in (js.update_stream(hostile), js.add_stream(hostile.evolve(name="EVIL")),
                    js.delete_stream("GITOPS_EVENTS"), js.purge_stream("GITOPS_EVENTS"),
                    js.create_key_value(bucket="evil"),
                    js.update_stream(nodes_bucket().config.evolve(max_msgs_per_subject=1))):
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.APIError)):
            await attempt  # a refused request gets no answer (the server logs a violation)
    await client.violation("$JS.API.STREAM.")
    admin = await as_identity("admin")  # type: ignore[operator]
    config = (await admin.nc.jetstream().stream_info("GITOPS_EVENTS")).config
    assert (config.subjects, config.max_msgs) == (["gitops.events.>"], -1)
    assert "EVIL" not in await admin.nc.jetstream().streams_info()


async def test_a_node_on_an_unprovisioned_server_says_to_run_nats_init(
    secured: tuple[NatsServer, Path], tmp_path: Path
) -> None:
    _server, out = secured
    shutil.copytree(out, tmp_path / "auth")
    server = start_nats(tmp_path, 'include "auth/auth.conf"\n')
    store = Store(tmp_path / "n1")
    agent = FakeAgent(store, "n1")
    agent.record("node.started")
    mesh = Mesh(agent, store, NatsOptions(servers=[server.url],
                                          nkey_seed_file=str(out / "n1.nk")))
    await mesh.start()
    try:
        await eventually_async(lambda: _async(len(mesh.problems) == 2 and mesh.ready),
                               what="the node found the stream and bucket missing")
        message = mesh.snapshot().message
        assert "stream GITOPS_EVENTS is missing" in message and "nats-init" in message
        assert store.outbox_stats()[0] == 1  # the event waits in the outbox
        nats_init(server, out)
        await eventually_async(lambda: _async(store.outbox_stats()[0] == 0 and not mesh.problems),
                               timeout=20, what="published once nats-init ran")
    finally:
        await mesh.close()
        store.close()
        server.stop()


async def test_observer_reads_but_cannot_trigger(
    secured: tuple[NatsServer, Path], as_identity: object, tmp_path: Path
) -> None:
    server, out = secured
    store = Store(tmp_path / "n2")
    agent = FakeAgent(store, "n2")
    mesh = Mesh(agent, store, NatsOptions(servers=[server.url],
                                          nkey_seed_file=str(out / "n2.nk")))
    await mesh.start()
    observer = await as_identity("observer")  # type: ignore[operator]
    notifier = await as_identity("notifier")  # type: ignore[operator]
    try:
        await eventually_async(lambda: _async(mesh.ready))
        reply = await observer.nc.request("gitops.rpc.n2.status", b"", timeout=5)
        assert json.loads(reply.data)["node"] == "n2"
        ping = await observer.nc.request("$SRV.PING.gitops-node", b"", timeout=5)
        assert json.loads(ping.data)["metadata"] == {"node": "n2"}  # discovery under auth
        for subject in ("gitops.rpc.n2.reconcile", "gitops.rpc.n2.suspend",
                        "gitops.fleet.reconcile", "gitops.source.changed"):
            await observer.nc.publish(subject, b"")
            await observer.violation(subject)
        await notifier.nc.publish("gitops.source.changed", b'{"repo":"r","branch":"b",'
                                  b'"revision":"c"}')
        await notifier.nc.publish("gitops.fleet.reconcile", b"")
        await notifier.violation("gitops.fleet.reconcile")
        await asyncio.sleep(0.2)  # let a (wrongly) delivered trigger arrive before checking
        assert agent.triggers == []
        assert not agent.suspended
    finally:
        await mesh.close()
        store.close()


async def test_password_mode_and_bad_credentials(tmp_path: Path) -> None:
    out = tmp_path / "auth"
    write_config(out, ["p1"], auth="password")
    env = dict(
        line.split("=", 1) for line in (out / "p1.env").read_text().splitlines()
    )
    assert env["GITOPS_MESH_NATS_USER"] == "p1" and len(env["GITOPS_MESH_NATS_PASSWORD"]) >= 24
    # re-running keeps existing credentials (running nodes are not locked out)
    write_config(out, ["p1", "p2"], auth="password")
    assert (out / "p1.env").read_text().splitlines()[1].endswith(env["GITOPS_MESH_NATS_PASSWORD"])
    server = start_nats(tmp_path, 'include "auth/auth.conf"\n')
    try:
        good = NatsOptions(servers=[server.url], user="p1",
                           password=env["GITOPS_MESH_NATS_PASSWORD"], inbox_prefix="_INBOX.p1")
        nc = await connect(good)
        await nc.close()
        bad = NatsOptions(servers=[server.url], user="p1", password="wrong-password")
        with pytest.raises(MeshError) as err:
            await connect(bad, timeout=3)
        assert str(err.value).startswith(f"cannot connect to NATS at {server.url}:")
        # The server's reason, or (when its reset discarded the -ERR on every attempt) a hint
        # that points at the credentials all the same.
        message = str(err.value).lower()
        assert "authorization" in message or "refuses these credentials" in message
        assert "wrong-password" not in str(err.value)
    finally:
        server.stop()


def test_bad_input_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(NatsConfigError, match="--node 'Bad_Id': node ids are"):
        write_config(tmp_path / "a", ["n1", "Bad_Id"])
    with pytest.raises(NatsConfigError, match="reserved"):
        write_config(tmp_path / "b", ["console"])
    with pytest.raises(NatsConfigError, match="at least one --node"):
        write_config(tmp_path / "c", [])
    assert not (tmp_path / "a").exists()


def make_tls(root: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    root.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def ssl_run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    ssl_run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=gitops-mesh test CA")
    ssl_run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl_run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    return root / "ca.pem", root / "server.pem", root / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a CA")
async def test_tls_with_a_ca_file(tmp_path: Path) -> None:
    ca, cert, key = make_tls(tmp_path / "tls")
    server = start_nats(tmp_path, f'tls {{\n  cert_file: "{cert}"\n  key_file: "{key}"\n}}\n')
    url = f"tls://127.0.0.1:{server.port}"
    store = Store(tmp_path / "state")
    agent = FakeAgent(store, "tls1")
    agent.record("node.started")
    mesh = Mesh(agent, store, NatsOptions(servers=[url], ca_file=str(ca)))
    await mesh.start()
    try:
        await eventually_async(lambda: _async(mesh.ready and store.outbox_stats()[0] == 0),
                               what="events over TLS")
        with pytest.raises(MeshError, match=f"cannot connect to NATS at {url}:") as err:
            await connect(NatsOptions(servers=[url]), timeout=3)  # no CA: not trusted
        assert "certificate verify failed" in str(err.value)
        with pytest.raises(MeshError, match=r"NATS CA file '/nope\.pem' does not exist"):
            await connect(NatsOptions(servers=[url], ca_file="/nope.pem"))
    finally:
        await mesh.close()
        store.close()
        server.stop()


async def test_console_and_observer_can_read_like_the_console_and_cli_do(
    secured: tuple[NatsServer, Path], as_identity: object, tmp_path: Path
) -> None:
    """On a server provisioned by nats-init the console follows the stream and bucket with
    ordered consumers (as console/feed.py does); the observer runs a `wait`."""
    from nats.js import api

    from reconciler.cli.mesh_cmds import read_fleet
    from reconciler.cli.wait_cmd import wait_for_revision
    from reconciler.mesh.subjects import (
        EVENTS_STREAM,
        EVENTS_SUBJECTS,
        KV_STREAM,
        KV_SUBJECT_PREFIX,
    )

    _server, out = secured
    shutil.copytree(out, tmp_path / "auth")
    server = start_nats(tmp_path, 'include "auth/auth.conf"\n')
    nats_init(server, out)
    opts = {"servers": [server.url]}
    console = await connect(NatsOptions(**opts, nkey_seed_file=str(out / "console.nk")))
    observer = await connect(NatsOptions(**opts, nkey_seed_file=str(out / "observer.nk")))
    store = Store(tmp_path / "n1")
    agent = FakeAgent(store, "n1")
    mesh = Mesh(agent, store, NatsOptions(**opts, nkey_seed_file=str(out / "n1.nk")))
    try:
        js = console.jetstream()
        seen: list[str] = []

        async def on_event(msg: object) -> None:
            seen.append(json.loads(msg.data)["type"])  # type: ignore[attr-defined]

        await js.subscribe(EVENTS_SUBJECTS, stream=EVENTS_STREAM, cb=on_event,
                           ordered_consumer=True, idle_heartbeat=2.0)
        kv_seen: list[str] = []

        async def on_kv(msg: object) -> None:
            kv_seen.append(msg.subject)  # type: ignore[attr-defined]

        await js.subscribe(f"{KV_SUBJECT_PREFIX}.>", stream=KV_STREAM, cb=on_kv,
                           ordered_consumer=True, idle_heartbeat=2.0,
                           deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
        agent.record("node.started")
        await mesh.start()
        await eventually_async(lambda: _async(seen == ["node.started"] and kv_seen),
                               what="console follows events and status")
        assert set(await read_fleet(observer)) == {"n1"}
        agent.trigger("test")  # no repo: the fake's revision stays None
        code = await wait_for_revision(observer, "0" * 40, None, ["n1"],
                                       time.monotonic() + 0.5)
        assert code == 2  # ran to its deadline with the observer's rights, no violation
    finally:
        await mesh.close()
        store.close()
        await console.close()
        await observer.close()
        server.stop()


async def test_the_push_hook_with_the_notifier_identity_reaches_the_node(
    secured: tuple[NatsServer, Path], tmp_path: Path
) -> None:
    server, out = secured
    repo = make_spec_repo(tmp_path / "specs", {"apps.json": "{}"})
    store = Store(tmp_path / "n1")
    agent = FakeAgent(store, "n1", repo_url=repo.url)
    mesh = Mesh(agent, store, NatsOptions(servers=[server.url],
                                          nkey_seed_file=str(out / "n1.nk")))
    await mesh.start()
    try:
        await eventually_async(lambda: _async(mesh.ready))
        hook = Path(reconciler.__file__).parent / "hooks" / "post-receive"
        env = {**os.environ, "GITOPS_MESH_NATS": server.url,
               "GITOPS_MESH_BIN": f"{sys.executable} -m reconciler",
               **dict(line.split("=", 1) for line in
                      (out / "notifier.env").read_text().splitlines())}
        rev = repo.head()
        proc = await asyncio.create_subprocess_exec(
            str(hook), cwd=repo.bare, env=env, stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate(f"{'0' * 40} {rev} refs/heads/main\n".encode())
        assert proc.returncode == 0 and err == b""
        await eventually_async(lambda: _async(agent.triggers), what="the node heard the push")
        assert agent.triggers == [f"source.changed {rev[:12]}"]
    finally:
        await mesh.close()
        store.close()


async def test_rollouts_under_least_privilege(
    secured: tuple[NatsServer, Path], as_identity: object, tmp_path: Path
) -> None:
    """A node identity creates, claims and reports into a rollout entry (CAS) and reads the
    fleet; the console identity pauses it and announces that; the observer only reads."""
    from reconciler.core.rollout_spec import RolloutSpec
    from reconciler.mesh.rollouts import operate_rollout, read_entry, rollouts_bucket

    server, out = secured
    store = Store(tmp_path / "n2")
    agent = FakeAgent(store, "n2", {"ring": "canary"})
    mesh = Mesh(agent, store, NatsOptions(servers=[server.url], inbox_prefix="_INBOX.n2",
                                          nkey_seed_file=str(out / "n2.nk")))
    await mesh.start()
    make = as_identity
    console = await make("console")  # type: ignore[operator]
    observer = await make("observer")  # type: ignore[operator]
    try:
        await eventually_async(lambda: _async(mesh.ready), what="n2 ready")
        spec = RolloutSpec.model_validate({"waves": [
            {"name": "canary", "nodes": {"match": {"ring": "canary"}}}, {"name": "fleet"}]})
        revision = "f" * 40
        coordinator = mesh.coordinator
        verdict, _ = await coordinator.consult(revision, spec, "n2", {"ring": "canary"}, None)
        assert verdict.kind == "apply"
        js = console.nc.jetstream()
        kv = await rollouts_bucket(js, create=False)
        assert kv is not None
        result = await operate_rollout(js, kv, NatsOptions(servers=[server.url]), revision,
                                       "pause", actor="console")
        assert result.entry is not None and result.entry.state == "paused"
        await coordinator.report(revision, "n2", {"ring": "canary"}, "synced", "")

        async def reported() -> bool:  # its report key, folded into the entry
            entry, _ = await read_entry(kv, revision)
            return entry is not None and entry.waves[0].synced == ["n2"]

        await eventually_async(reported, what="n2's report in the entry")
        # a node writes its own report key only: not another node's
        other = await make("n1")  # type: ignore[operator]
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await other.nc.jetstream().publish(f"$KV.gitops_rollouts.{revision}.n2", b"{}",
                                               timeout=1)
        await other.violation(f"$KV.gitops_rollouts.{revision}.n2")
        seen = asyncio.Event()
        coordinator.watch(revision, lambda state: seen.set())
        await asyncio.wait_for(seen.wait(), 10)  # the node may watch its entry
        info = await js.stream_info("GITOPS_EVENTS",
                                    subjects_filter="gitops.events.console.rollout.>")
        assert info.state.subjects == {"gitops.events.console.rollout.paused": 1}

        okv = await rollouts_bucket(observer.nc.jetstream(), create=False)
        assert okv is not None
        got, _ = await read_entry(okv, revision)
        assert got is not None and got.state == "paused"  # the observer reads (wait, status)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await observer.nc.jetstream().publish(f"$KV.gitops_rollouts.{revision}", b"{}",
                                                  timeout=1)
        await observer.violation("$KV.gitops_rollouts")
    finally:
        await mesh.close()
        store.close()
