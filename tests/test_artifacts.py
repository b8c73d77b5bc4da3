"""ArtifactStore: archives (file://, http, repo-relative) and git sources into version dirs."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from reconciler.core.errors import ArtifactError, SourceError
from reconciler.core.spec import AppSpec
from reconciler.node.artifacts import MARKER, ArtifactStore, Limits
from reconciler.node.source import GitSource
from tests.conftest import eventually, free_port, git, make_spec_repo

RUN_SH = b"#!/bin/sh\necho hello\n"


def app(source: dict[str, Any] | None = None, name: str = "web", version: str = "1.0") -> AppSpec:
    doc: dict[str, Any] = {"name": name, "version": version}
    if source is not None:
        doc["source"] = source
    return AppSpec.model_validate(doc)


def archive_source(data: bytes, url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "archive", "url": url, "sha256": hashlib.sha256(data).hexdigest(), **extra}


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]], gzip: bool = True) -> bytes:
    buf = io.BytesIO()
    with (
        tarfile.open(fileobj=buf, mode="w:gz") if gzip else tarfile.open(fileobj=buf, mode="w")
    ) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, data: bytes | None = b"x", mode: int = 0o644, **attrs: Any) -> tuple[
    tarfile.TarInfo, bytes | None
]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    for key, value in attrs.items():
        setattr(info, key, value)
    if info.type != tarfile.REGTYPE:
        data = None
    return info, data


def good_tar() -> bytes:
    return make_tar([
        member("app-1.0/", type=tarfile.DIRTYPE, mode=0o755),
        member("app-1.0/bin/run.sh", RUN_SH, mode=0o755),
        member("app-1.0/conf/app.conf", b"port=8080\n"),
        member("app-1.0/conf/current", type=tarfile.SYMTYPE, linkname="app.conf"),
    ])


def tree(root: Path) -> dict[str, str]:
    """Every entry below root: file contents, 'dir', or '-> target' for links."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = path.read_text()
    return out


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "state" / "apps", timeout=5)


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / "dl" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path.as_uri()


def test_archive_from_file_url_installs_stripped_with_modes(
    store: ArtifactStore, tmp_path: Path
) -> None:
    data = good_tar()
    spec = app(archive_source(data, write(tmp_path, "app.tgz", data), strip_components=1))
    installed = store.install(spec)
    assert installed == store.path_for(spec)
    assert installed.parent == store.root / "web"
    assert installed.name == f"1.0-{hashlib.sha256(data).hexdigest()[:12]}s1"
    assert tree(installed) == {
        MARKER: installed.joinpath(MARKER).read_text(),
        "bin": "dir",
        "bin/run.sh": RUN_SH.decode(),
        "conf": "dir",
        "conf/app.conf": "port=8080\n",
        "conf/current": "-> app.conf",
    }
    assert os.access(installed / "bin" / "run.sh", os.X_OK)
    assert not os.access(installed / "conf" / "app.conf", os.X_OK)
    assert store.is_installed(spec)
    assert store.versions("web") == [installed]


def test_install_is_idempotent_and_replaces_incomplete_dirs(
    store: ArtifactStore, tmp_path: Path
) -> None:
    data = good_tar()
    url = write(tmp_path, "app.tgz", data)
    spec = app(archive_source(data, url))
    first = store.install(spec)
    (tmp_path / "dl" / "app.tgz").unlink()  # a complete dir is reused: no second download
    assert store.install(spec) == first

    # kill -9 leftovers: a staging dir and a final dir without its marker.
    other = app(archive_source(data, write(tmp_path, "app2.tgz", data)), version="2.0")
    half = store.path_for(other)
    half.mkdir(parents=True)
    (half / "partial").write_text("half written")
    stale = store.root / "web" / ".tmp-2.0-abc"
    stale.mkdir()
    assert not store.is_installed(other)
    assert store.install(other) == half
    assert "partial" not in tree(half)
    assert store.gc("web", {first, half}) == [stale]


def test_none_source_gets_an_empty_dir(store: ArtifactStore) -> None:
    spec = app()
    installed = store.install(spec)
    assert installed.name == f"1.0-{spec.spec_hash()[:12]}"
    assert tree(installed) == {MARKER: installed.joinpath(MARKER).read_text()}


def test_archive_from_repo_relative_path(store: ArtifactStore, tmp_path: Path) -> None:
    data = good_tar()
    repo = make_spec_repo(tmp_path / "specs", {"apps/web.yaml": "name: web\nversion: '1'\n"})
    (repo.work / "artifacts").mkdir()
    (repo.work / "artifacts" / "web.tgz").write_bytes(data)
    revision = repo.commit_and_push("add artifact")
    with GitSource(repo.url, "main", tmp_path / "cache") as source:
        source.fetch()
        spec = app(archive_source(data, "artifacts/web.tgz", strip_components=1))
        installed = store.install(spec, partial(source.read_file, revision))
        assert (installed / "bin" / "run.sh").read_bytes() == RUN_SH

        escaping = app(archive_source(data, "../remote.git/HEAD"), version="2")
        with pytest.raises(ArtifactError, match="escapes the repository"):
            store.install(escaping, partial(source.read_file, revision))
    with pytest.raises(ArtifactError, match="repo-relative archive needs the spec repository"):
        store.install(app(archive_source(data, "artifacts/web.tgz"), version="3"))


def test_wrong_sha256_refused_before_unpacking(store: ArtifactStore, tmp_path: Path) -> None:
    data = good_tar()
    wrong = "0" * 64
    spec = app({"type": "archive", "url": write(tmp_path, "app.tgz", data), "sha256": wrong})
    with pytest.raises(ArtifactError) as err:
        store.install(spec)
    actual = hashlib.sha256(data).hexdigest()
    # a file:// archive is any file on the node: its hash is never published (issue #10.8)
    assert f"expected {wrong}, the node-local file differs" in str(err.value)
    assert actual not in str(err.value)
    assert list((store.root / "web").iterdir()) == []  # nothing left behind


def test_wrong_sha256_of_a_repo_file_names_its_digest(store: ArtifactStore) -> None:
    data = good_tar()
    wrong = "0" * 64
    spec = app({"type": "archive", "url": "artifacts/app.tgz", "sha256": wrong})
    with pytest.raises(ArtifactError) as err:
        store.install(spec, read_repo_file=lambda path: data)
    assert f"expected {wrong}, got {hashlib.sha256(data).hexdigest()}" in str(err.value)


@pytest.mark.timeout(20)
def test_a_file_url_that_is_not_a_regular_file_is_refused_at_once(
    store: ArtifactStore, tmp_path: Path
) -> None:
    """A FIFO never delivers (it hung the reconcile), a device never ends: refused."""
    fifo = tmp_path / "pipe.tgz"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        spec = app({"type": "archive", "url": path.as_uri(), "sha256": "0" * 64})
        with pytest.raises(ArtifactError, match="not a regular file"):
            store.install(spec)


UNSAFE = {
    "dotdot": ([member("../evil.sh")], "'..' in path"),
    "nested dotdot": ([member("ok/../../evil.sh")], "'..' in path"),
    "absolute": ([member("/tmp/evil.sh")], "absolute path"),
    "absolute symlink": (
        [member("etc", type=tarfile.SYMTYPE, linkname="/etc")], "symlink to '/etc'"
    ),
    "relative symlink escape": (
        [member("sub/up", type=tarfile.SYMTYPE, linkname="../../outside")], "points outside"
    ),
    "symlink chain escape": (
        [
            member("d/", type=tarfile.DIRTYPE, mode=0o755),
            member("d/root", type=tarfile.SYMTYPE, linkname=".."),  # = dest itself: fine alone
            member("d/up", type=tarfile.SYMTYPE, linkname="root/.."),  # dest/.. through 'root'
        ],
        "through another link",
    ),
    "write through symlink": (
        [member("link", type=tarfile.SYMTYPE, linkname="."), member("link/x.sh")],
        "goes through a symlink",
    ),
    "hardlink outside": (
        [member("passwd", type=tarfile.LNKTYPE, linkname="../../etc/passwd")], "'..' in path"
    ),
    "hardlink to absolute": (
        [member("passwd", type=tarfile.LNKTYPE, linkname="/etc/passwd")], "absolute path"
    ),
    "device": ([member("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)], "device"),
    "fifo": ([member("pipe", type=tarfile.FIFOTYPE)], "device or special file"),
}


@pytest.mark.parametrize("case", list(UNSAFE), ids=list(UNSAFE))
def test_unsafe_tar_entries_refused_and_nothing_left(
    case: str, store: ArtifactStore, tmp_path: Path
) -> None:
    members, reason = UNSAFE[case]
    data = make_tar([member("good.txt", b"fine"), *members])
    with pytest.raises(ArtifactError, match="unsafe entry") as err:
        store.install(app(archive_source(data, write(tmp_path, "bad.tgz", data))))
    assert reason in str(err.value)
    assert list((store.root / "web").iterdir()) == []
    assert not (tmp_path / "outside").exists()
    assert not (store.root / "evil.sh").exists() and not (store.root.parent / "evil.sh").exists()


def test_hardlink_inside_is_copied(store: ArtifactStore, tmp_path: Path) -> None:
    data = make_tar([
        member("bin/tool", RUN_SH, mode=0o755),
        member("bin/alias", type=tarfile.LNKTYPE, linkname="bin/tool", mode=0o755),
    ], gzip=False)
    installed = store.install(app(archive_source(data, write(tmp_path, "a.tar", data))))
    assert (installed / "bin" / "alias").read_bytes() == RUN_SH
    assert os.stat(installed / "bin" / "alias").st_nlink == 1


def make_zip(entries: dict[str, tuple[bytes, int]], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, (data, mode) in entries.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            zf.writestr(info, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120000 | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def test_zip_archive(store: ArtifactStore, tmp_path: Path) -> None:
    data = make_zip(
        {"pkg/run.sh": (RUN_SH, 0o755), "pkg/data/a.txt": (b"a", 0o644)},
        links={"pkg/data/b.txt": "a.txt"},
    )
    spec = app(archive_source(data, write(tmp_path, "app.zip", data), strip_components=1))
    installed = store.install(spec)
    assert {k: v for k, v in tree(installed).items() if k != MARKER} == {
        "data": "dir", "data/a.txt": "a", "data/b.txt": "-> a.txt", "run.sh": RUN_SH.decode(),
    }
    assert os.access(installed / "run.sh", os.X_OK)

    evil = make_zip({"ok.txt": (b"ok", 0o644)}, links={"escape": "../../../etc/passwd"})
    with pytest.raises(ArtifactError, match=r"'escape'.*points outside"):
        store.install(app(archive_source(evil, write(tmp_path, "evil.zip", evil)), version="2"))
    bad = make_zip({"../x.txt": (b"x", 0o644)})
    with pytest.raises(ArtifactError, match=r"unsafe entry '\.\./x\.txt'"):
        store.install(app(archive_source(bad, write(tmp_path, "bad.zip", bad)), version="3"))
    assert store.versions("web") == [installed]
    assert len(list((store.root / "web").iterdir())) == 1


def test_size_cap_and_not_an_archive(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "apps", limits=Limits(max_unpacked_bytes=1000))
    big = make_tar([member("big.bin", b"\0" * 5000)])
    with pytest.raises(ArtifactError, match="unpacks to more than 1000 bytes"):
        store.install(app(archive_source(big, write(tmp_path, "big.tgz", big))))
    junk = b"this is not an archive"
    with pytest.raises(ArtifactError, match="not a tar or zip archive"):
        store.install(app(archive_source(junk, write(tmp_path, "junk.tgz", junk))))
    small = ArtifactStore(tmp_path / "apps2", limits=Limits(max_download_bytes=10))
    with pytest.raises(ArtifactError, match="larger than 10 bytes"):
        small.install(app(archive_source(big, write(tmp_path, "big2.tgz", big))))
    assert list((tmp_path / "apps" / "web").iterdir()) == []


def test_unfetchable_archives(store: ArtifactStore, tmp_path: Path) -> None:
    data = good_tar()
    missing = (tmp_path / "nope.tgz").as_uri()
    with pytest.raises(SourceError, match="cannot read"):
        store.install(app(archive_source(data, missing)))
    with pytest.raises(ArtifactError, match="unsupported archive URL"):
        store.install(app(archive_source(data, "ftp://example.invalid/a.tgz")))
    refused = f"http://user:pw@127.0.0.1:{free_port()}/a.tgz"
    with pytest.raises(SourceError, match="download failed") as err:
        store.install(app(archive_source(data, refused)))
    assert "pw" not in str(err.value)


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_http_download(store: ArtifactStore, http_dir: tuple[str, Path]) -> None:
    base, root = http_dir
    data = good_tar()
    (root / "app.tgz").write_bytes(data)
    installed = store.install(app(archive_source(data, f"{base}/app.tgz", strip_components=1)))
    assert (installed / "conf" / "app.conf").read_text() == "port=8080\n"
    with pytest.raises(SourceError, match="HTTP 404"):
        store.install(app(archive_source(data, f"{base}/missing.tgz"), version="2"))


class _AuthHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files only with `Authorization: Basic deploy:s3cr@t`."""

    def do_GET(self) -> None:
        expected = "Basic " + base64.b64encode(b"deploy:s3cr@t").decode()
        if self.headers.get("Authorization") != expected:
            self.send_error(401, "Unauthorized")
            return
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


def test_http_basic_auth_from_url(store: ArtifactStore, tmp_path: Path) -> None:
    root = tmp_path / "private"
    root.mkdir()
    data = good_tar()
    (root / "app.tgz").write_bytes(data)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_AuthHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        good = f"http://deploy:s3cr%40t@127.0.0.1:{port}/app.tgz"
        installed = store.install(app(archive_source(data, good, strip_components=1)))
        assert (installed / "bin" / "run.sh").read_bytes() == RUN_SH
        bad = f"http://deploy:wrong@127.0.0.1:{port}/app.tgz"
        with pytest.raises(SourceError, match="HTTP 401") as err:
            store.install(app(archive_source(data, bad), version="2"))
        assert "wrong" not in str(err.value)
    finally:
        server.shutdown()
        server.server_close()


def test_git_source_at_tag_with_subdir(store: ArtifactStore, tmp_path: Path) -> None:
    repo = make_spec_repo(tmp_path / "code", {"svc/run.sh": "v1", "README": "r"})
    git(repo.work, "tag", "v1")
    git(repo.work, "push", "-q", "origin", "v1")
    tagged = repo.head()
    repo.write("svc/run.sh", "v2")
    repo.commit_and_push("v2")

    at_tag = store.install(app({"type": "git", "url": repo.url, "ref": "v1"}))
    assert tree(at_tag) == {
        MARKER: at_tag.joinpath(MARKER).read_text(),
        "README": "r", "svc": "dir", "svc/run.sh": "v1",
    }
    sub = store.install(
        app({"type": "git", "url": repo.url, "ref": "main", "subdir": "svc"}, version="2")
    )
    assert {k: v for k, v in tree(sub).items() if k != MARKER} == {"run.sh": "v2"}
    pinned = store.install(app({"type": "git", "url": repo.url, "ref": tagged}, version="3"))
    assert (pinned / "svc" / "run.sh").read_text() == "v1"

    with pytest.raises(SourceError, match="at nope"):
        store.install(app({"type": "git", "url": repo.url, "ref": "nope"}, version="4"))
    with pytest.raises(ArtifactError, match="not a directory"):
        store.install(
            app({"type": "git", "url": repo.url, "ref": "v1", "subdir": "nope"}, version="5")
        )
    assert sorted(store.versions("web")) == sorted([at_tag, sub, pinned])


def test_git_subdir_through_a_symlink_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "inner").mkdir(parents=True)
    (outside / "inner" / "precious").write_text("keep me")
    repo = make_spec_repo(tmp_path / "code", {"README": "r"})
    (repo.work / "link").symlink_to(outside)
    repo.commit_and_push("a link out of the repo")
    with pytest.raises(ArtifactError, match="not a directory"):
        store.install(app({"type": "git", "url": repo.url, "ref": "main", "subdir": "link/inner"}))
    assert (outside / "inner" / "precious").read_text() == "keep me"
    assert list((store.root / "web").iterdir()) == []


def test_gc_keeps_given_dirs_and_remove_app(store: ArtifactStore) -> None:
    dirs = [store.install(app(version=str(v))) for v in range(4)]
    assert store.gc("web", {dirs[2], dirs[3]}) == sorted(dirs[:2])
    assert store.versions("web") == sorted(dirs[2:])
    assert store.gc("web", {dirs[2], dirs[3]}) == []
    assert store.gc("other", set()) == []
    store.remove_app("web")
    assert not (store.root / "web").exists()
    with pytest.raises(ValueError, match="invalid app name"):
        store.gc("../state", set())


@pytest.fixture
def dripping_server() -> Iterator[str]:
    """An HTTP server that answers 200 and then sends one byte every 50 ms, forever."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:  # closed at teardown: the download gave up before it connected
            return
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
            while not stop.wait(0.05):
                try:
                    conn.sendall(b"x")
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/slow.tgz"
    stop.set()
    thread.join(timeout=2)
    server.close()


def test_stalled_download_gives_up(dripping_server: str, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "apps", timeout=5, limits=Limits(max_download_seconds=0.3))
    with pytest.raises(SourceError, match=r"download took longer than 0.3s"):
        store.install(app(archive_source(b"", dripping_server)))
    assert list((tmp_path / "apps" / "web").iterdir()) == []


KILLED_INSTALL = """
import sys
from pathlib import Path
from reconciler.node.artifacts import ArtifactStore
from reconciler.core.spec import AppSpec
spec = AppSpec.model_validate_json(sys.argv[2])
ArtifactStore(Path(sys.argv[1])).install(spec)
"""


def _start_install(store: ArtifactStore, spec: AppSpec) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", KILLED_INSTALL, str(store.root), spec.model_dump_json()]
    )


def test_kill_9_during_download_leaves_nothing_usable(
    dripping_server: str, tmp_path: Path
) -> None:
    data = good_tar()
    # the child's download drips forever from the server, until we kill it mid-way
    spec = app(archive_source(data, dripping_server))
    store = ArtifactStore(tmp_path / "apps")
    proc = _start_install(store, spec)
    app_dir = store.root / "web"
    try:
        def downloading() -> bool:
            assert proc.poll() is None, "the child died before downloading"
            return any(app_dir.glob(".tmp-*.download"))

        eventually(downloading, what="the child is mid-download")
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert not store.path_for(spec).exists() and not store.is_installed(spec)
    # the same archive (same sha256, so the same version dir) from a complete source
    again = app(archive_source(data, write(tmp_path, "app.tgz", data)))
    installed = store.install(again)
    assert (installed / "app-1.0" / "bin" / "run.sh").read_bytes() == RUN_SH
    assert store.gc("web", {installed})  # the dead child's staging dir and download
    assert list(app_dir.iterdir()) == [installed]


def test_kill_9_during_unpack_leaves_no_half_dir(tmp_path: Path) -> None:
    data = make_tar([member(f"f/{i:05d}.txt", b"data" * 64) for i in range(600)])
    spec = app(archive_source(data, write(tmp_path, "many.tgz", data)))
    store = ArtifactStore(tmp_path / "apps")
    proc = _start_install(store, spec)
    app_dir = store.root / "web"
    try:
        # On a fast disk the child may finish first; the invariant below holds either way.
        eventually(lambda: proc.poll() is not None or any(app_dir.glob(".tmp-*/f/*")),
                   timeout=30, interval=0.005, what="the child started unpacking")
    finally:
        proc.kill()
        proc.wait()
    # Either the rename had not happened (no final dir) or it had and the dir is complete.
    final = store.path_for(spec)
    assert not final.exists() or store.is_installed(spec)
    installed = store.install(spec)
    assert len(list((installed / "f").iterdir())) == 600
    store.gc("web", {installed})
    assert list(app_dir.iterdir()) == [installed]
