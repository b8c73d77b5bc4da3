"""`notify`'s stdlib publisher against real nats-servers: every auth kind, TLS, a dead server."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import nats
import nkeys
import pytest
from conftest import NatsServer, start_nats
from test_nats_auth import make_tls

from reconciler.mesh import fastpub
from reconciler.mesh.fastpub import Auth, PublishError, publish
from reconciler.mesh.permissions import write_config


def test_ed25519_and_nkey_encoding_match_the_nkeys_library() -> None:
    for _ in range(3):
        seed = bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()
        pair = nkeys.from_seed(bytearray(seed.encode()))
        assert fastpub.public_key(seed) == pair.public_key.decode()
        nonce = os.urandom(11)
        assert fastpub.ed25519_sign(fastpub.seed_bytes(seed), nonce) == bytes(pair.sign(nonce))
    with pytest.raises(PublishError, match="checksum"):
        good = bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()
        fastpub.seed_bytes(good[:-3] + ("A" if good[-3] != "A" else "B") + good[-2:])


def test_creds_files_are_read_like_nats_py_reads_them(tmp_path: Path) -> None:
    seed = bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()
    creds = tmp_path / "user.creds"
    creds.write_text(f"""-----BEGIN NATS USER JWT-----
eyJhbGciOi.payload.sig
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------
""")
    assert fastpub._read_creds(str(creds)) == ("eyJhbGciOi.payload.sig", seed)


async def _received(server: NatsServer, auth: Auth, url: str | None = None, **connect: object
                    ) -> bytes:
    """Publish with `auth` while a subscriber (with `connect` options) listens."""
    nc = await nats.connect(server.url, **connect)  # type: ignore[arg-type]
    try:
        sub = await nc.subscribe("gitops.source.changed")
        await nc.flush()
        await asyncio.to_thread(publish, [url or server.url], "gitops.source.changed",
                                b'{"revision": "abc"}', auth)
        return (await sub.next_msg(timeout=5)).data
    finally:
        await nc.close()


async def test_token_password_and_a_dead_first_server(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    server = start_nats(tmp_path / "a", "authorization { token: s3cr3t-t0ken }\n")
    try:
        data = await _received(server, Auth(token="s3cr3t-t0ken"), token="s3cr3t-t0ken")
        assert data == b'{"revision": "abc"}'
        with pytest.raises(PublishError, match=r"(?i)authorization"):
            await asyncio.to_thread(publish, [server.url], "x", b"", Auth(token="wrong"))
    finally:
        server.stop()
    (tmp_path / "b").mkdir()
    server = start_nats(tmp_path / "b", "authorization { user: u, password: p4ss }\n")
    try:
        dead = "nats://127.0.0.1:1"
        nc_auth = {"user": "u", "password": "p4ss"}
        assert await _received(server, Auth(user="u", password="p4ss"), **nc_auth)
        # a cluster URL list with a dead server first: the next one takes it
        nc = await nats.connect(server.url, **nc_auth)  # type: ignore[arg-type]
        try:
            sub = await nc.subscribe("s")
            await nc.flush()
            used = await asyncio.to_thread(
                publish, [dead, f"nats://u:p4ss@127.0.0.1:{server.port}"], "s", b"1", Auth())
            assert used == server.url  # reported without the password
            assert (await sub.next_msg(timeout=5)).data == b"1"
        finally:
            await nc.close()
    finally:
        server.stop()


async def test_the_notifier_nkey_from_nats_config(tmp_path: Path) -> None:
    write_config(tmp_path / "auth", ["n1"])
    server = start_nats(tmp_path, 'include "auth/auth.conf"\n')
    try:
        data = await _received(server, Auth(nkey_seed_file=str(tmp_path / "auth/notifier.nk")),
                               nkeys_seed=str(tmp_path / "auth/n1.nk"), inbox_prefix="_INBOX.n1")
        assert data == b'{"revision": "abc"}'
        # the notifier may publish nothing else: the server says so, and so does publish()
        with pytest.raises(PublishError, match=r"(?i)permissions violation"):
            await asyncio.to_thread(publish, [server.url], "gitops.fleet.reconcile", b"",
                                    Auth(nkey_seed_file=str(tmp_path / "auth/notifier.nk")))
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a CA")
async def test_tls_with_a_ca_file(tmp_path: Path) -> None:
    ca, cert, key = make_tls(tmp_path / "tls")
    server = start_nats(tmp_path, f'tls {{\n  cert_file: "{cert}"\n  key_file: "{key}"\n}}\n')
    try:
        import ssl

        context = ssl.create_default_context(cafile=str(ca))
        data = await _received(server, Auth(ca_file=str(ca)), url=f"tls://127.0.0.1:{server.port}",
                               tls=context)
        assert data == b'{"revision": "abc"}'
        with pytest.raises(PublishError, match=r"(?i)certificate"):
            await asyncio.to_thread(publish, [server.url], "x", b"", Auth())
    finally:
        server.stop()
