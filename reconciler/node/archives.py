"""Archive sources: download (http(s), file://, a repo-relative path), check the sha256 and
unpack safely. I/O shell, loaded by ArtifactStore only when an app's source is an archive
(urllib.request, http.client and tarfile stay off every other agent start)."""

from __future__ import annotations

import base64
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from reconciler.core.errors import ArtifactError, SourceError
from reconciler.core.spec import ArchiveSource
from reconciler.node.artifacts import (
    Limits,
    ReadRepoFile,
    _create,
    _display,
    _remove_existing,
    _through_symlink,
)
from reconciler.node.bounded import RefusedFile, open_regular

_CHUNK = 1 << 16


def install(
    source: ArchiveSource,
    dest: Path,
    read_repo_file: ReadRepoFile | None,
    timeout: float,
    limits: Limits,
) -> None:
    """Download `source`, check its sha256 and unpack it into the existing dir `dest`.

    Raises ArtifactError when the artifact is wrong and SourceError when it could not be
    fetched (see ArtifactStore.install).
    """
    # The download lands next to dest (same filesystem), outside the tree that is renamed.
    download = dest.with_name(dest.name + ".download")
    try:
        with open(download, "w+b") as fh:
            digest = _fetch(source.url, fh, read_repo_file, timeout, limits)
            if digest != source.sha256:
                # A file:// archive is any file on the node: its digest is not shown
                # (events and status would publish the hash of, say, a key file).
                node_local = urllib.parse.urlsplit(source.url).scheme.lower() == "file"
                got = "the node-local file differs" if node_local else f"got {digest}"
                raise ArtifactError(
                    f"{_display(source.url)}: sha256 mismatch: expected {source.sha256}, "
                    f"{got}"
                )
            fh.seek(0)
            unpack(fh, dest, source.strip_components, limits, _display(source.url))
    finally:
        download.unlink(missing_ok=True)


def _fetch(
    url: str, out: BinaryIO, read_repo_file: ReadRepoFile | None, timeout: float,
    limits: Limits,
) -> str:
    """Copy the archive into `out` under the size cap; return its sha256 hex digest."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    shown = _display(url)
    if scheme in ("http", "https"):
        try:
            request = _http_request(url)
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return _copy(resp, out, shown, limits)
        except urllib.error.HTTPError as exc:
            raise SourceError(f"{shown}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SourceError(f"{shown}: download failed: {reason}") from exc
    if scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        try:
            with open_regular(path) as fh:  # a device or a pipe may never end or deliver
                return _copy(fh, out, shown, limits)
        except RefusedFile as exc:
            raise ArtifactError(f"{shown}: {exc}") from None
        except OSError as exc:
            raise SourceError(f"{shown}: cannot read: {exc.strerror or exc}") from exc
    if scheme or url.startswith("/"):
        raise ArtifactError(
            f"{shown}: unsupported archive URL (use http(s)://, file:// or a "
            "repo-relative path)"
        )
    if read_repo_file is None:
        raise ArtifactError(f"{shown}: a repo-relative archive needs the spec repository")
    data = read_repo_file(url)
    if len(data) > limits.max_download_bytes:
        raise ArtifactError(f"{shown}: larger than {limits.max_download_bytes} bytes")
    out.write(data)
    out.flush()
    return hashlib.sha256(data).hexdigest()


def _copy(src: IO[bytes], out: BinaryIO, shown: str, limits: Limits) -> str:
    digest = hashlib.sha256()
    total = 0
    deadline = time.monotonic() + limits.max_download_seconds
    # read1: whatever has arrived, so a slow drip cannot hold one read() past the deadline.
    read = getattr(src, "read1", src.read)
    while chunk := read(_CHUNK):
        if time.monotonic() > deadline:
            raise SourceError(
                f"{shown}: download took longer than {limits.max_download_seconds:g}s"
            )
        total += len(chunk)
        if total > limits.max_download_bytes:
            raise ArtifactError(f"{shown}: larger than {limits.max_download_bytes} bytes")
        digest.update(chunk)
        out.write(chunk)
    out.flush()
    return digest.hexdigest()


def _http_request(url: str) -> urllib.request.Request:
    """A GET for `url`; `user:password@` in the URL becomes a Basic Authorization header
    (urllib itself would read it as part of the host)."""
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "gitops-mesh"}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        netloc = parts.hostname or ""
        if ":" in netloc:  # an IPv6 literal
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return urllib.request.Request(url, headers=headers)


# -- unpacking ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One archive member, format-neutral."""

    name: str
    kind: str  # file | dir | symlink | hardlink | special
    mode: int
    size: int
    link: str = ""


def unpack(fh: BinaryIO, dest: Path, strip: int, limits: Limits, shown: str) -> None:
    """Unpack a tar (plain, gz, bz2, xz) or zip archive into the existing dir `dest`.

    Every entry is checked before anything is written: no absolute paths, no `..`, no links
    pointing outside, no device files. On any refusal the caller removes `dest`.
    """
    if zipfile.is_zipfile(fh):
        fh.seek(0)
        with zipfile.ZipFile(fh) as zf:
            _extract(list(_zip_entries(zf)), dest, strip, limits, shown,
                     lambda e: zf.open(e.name))
        return
    fh.seek(0)
    try:
        tf = tarfile.open(fileobj=fh, mode="r:*")  # noqa: SIM115 - closed by `with tf` below
    except tarfile.TarError as exc:
        raise ArtifactError(f"{shown}: not a tar or zip archive ({exc})") from exc
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArtifactError(f"{shown}: corrupt archive ({exc})") from exc
        by_name = {m.name: m for m in members}

        def opener(entry: _Entry) -> IO[bytes]:
            stream = tf.extractfile(by_name[entry.name])
            assert stream is not None
            return stream

        _extract([_tar_entry(m) for m in members], dest, strip, limits, shown, opener)


def _tar_entry(m: tarfile.TarInfo) -> _Entry:
    if m.isreg():
        kind = "file"
    elif m.isdir():
        kind = "dir"
    elif m.issym():
        kind = "symlink"
    elif m.islnk():
        kind = "hardlink"
    else:
        kind = "special"
    return _Entry(m.name, kind, m.mode, m.size, m.linkname)


def _zip_entries(zf: zipfile.ZipFile) -> Iterator[_Entry]:
    for info in zf.infolist():
        unix_mode = info.external_attr >> 16
        if info.is_dir():
            yield _Entry(info.filename, "dir", 0o755, 0)
        elif stat.S_ISLNK(unix_mode):
            target = zf.read(info).decode("utf-8", errors="replace")
            yield _Entry(info.filename, "symlink", 0o777, 0, target)
        elif unix_mode and not stat.S_ISREG(unix_mode):
            yield _Entry(info.filename, "special", unix_mode, 0)
        else:
            yield _Entry(info.filename, "file", unix_mode & 0o777 or 0o644, info.file_size)


def _clean_parts(name: str, shown: str) -> list[str]:
    """Split an entry name into safe components or refuse it."""
    if name.startswith("/") or "\\" in name or "\0" in name or re.match(r"^[A-Za-z]:", name):
        raise ArtifactError(f"{shown}: unsafe entry {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArtifactError(f"{shown}: unsafe entry {name!r}: '..' in path")
    return parts


def _extract(
    entries: list[_Entry],
    dest: Path,
    strip: int,
    limits: Limits,
    shown: str,
    opener: Callable[[_Entry], IO[bytes]],
) -> None:
    if len(entries) > limits.max_entries:
        raise ArtifactError(f"{shown}: more than {limits.max_entries} entries")
    # Pass 1: decide every entry's target without touching the disk.
    plan: list[tuple[_Entry, list[str]]] = []
    total = 0
    for entry in entries:
        parts = _clean_parts(entry.name, shown)
        if entry.kind == "special":
            raise ArtifactError(f"{shown}: unsafe entry {entry.name!r}: device or special file")
        if entry.kind == "hardlink":
            link_parts = _clean_parts(entry.link, shown)
            if len(link_parts) <= strip:
                raise ArtifactError(f"{shown}: unsafe entry {entry.name!r}: hard link outside")
        if entry.kind == "file":
            total += entry.size
            if total > limits.max_unpacked_bytes:
                raise ArtifactError(
                    f"{shown}: unpacks to more than {limits.max_unpacked_bytes} bytes"
                )
        if len(parts) <= strip:
            continue  # like tar --strip-components: shallower entries are dropped
        if entry.kind == "symlink":
            _check_symlink(entry, parts[strip:], shown)
        plan.append((entry, parts[strip:]))

    # Pass 2: write. Every parent must be a real dir we made, never a symlink from the archive
    # (a chain of individually harmless links can otherwise climb out of dest).
    written = 0
    for entry, parts in plan:
        target = dest.joinpath(*parts)
        _ensure_parent(dest, parts, shown, entry.name)
        if entry.kind == "dir":
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                raise ArtifactError(f"{shown}: unsafe entry {entry.name!r}: replaces a non-dir")
            target.mkdir(exist_ok=True)
            continue
        _remove_existing(target, shown, entry.name)
        if entry.kind == "symlink":
            os.symlink(entry.link, target)
        elif entry.kind == "hardlink":
            link_parts = _clean_parts(entry.link, shown)[strip:]
            source = dest.joinpath(*link_parts)
            if _through_symlink(dest, link_parts) or not source.is_file():
                raise ArtifactError(
                    f"{shown}: unsafe entry {entry.name!r}: hard link to {entry.link!r}, "
                    "not a regular file of the archive"
                )
            shutil.copyfile(source, target)  # a copy: a hard link could share an inode outside
            os.chmod(target, _file_mode(entry.mode))
        else:
            with opener(entry) as src, _create(target) as out:
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    if written > limits.max_unpacked_bytes:  # the header may have lied
                        raise ArtifactError(
                            f"{shown}: unpacks to more than {limits.max_unpacked_bytes} bytes"
                        )
                    out.write(chunk)
            os.chmod(target, _file_mode(entry.mode))

    # Each link was checked lexically above; a chain of links (one going through another) can
    # still climb out, so resolve every link for real now that all of them exist.
    root = os.path.realpath(dest)
    for entry, parts in plan:
        if entry.kind == "symlink":
            real = os.path.realpath(dest.joinpath(*parts))
            if real != root and not real.startswith(root + os.sep):
                raise ArtifactError(
                    f"{shown}: unsafe entry {entry.name!r}: symlink to {entry.link!r} "
                    "points outside (through another link)"
                )


def _check_symlink(entry: _Entry, parts: list[str], shown: str) -> None:
    link = entry.link
    if not link or link.startswith("/") or "\0" in link:
        raise ArtifactError(f"{shown}: unsafe entry {entry.name!r}: symlink to {link!r}")
    # Resolved lexically from the link's own dir, in the stripped layout: dest is the boundary.
    resolved = posixpath.normpath(posixpath.join(*parts[:-1], link) if parts[:-1] else link)
    if resolved == ".." or resolved.startswith("../"):
        raise ArtifactError(
            f"{shown}: unsafe entry {entry.name!r}: symlink to {link!r} points outside"
        )


def _ensure_parent(dest: Path, parts: list[str], shown: str, name: str) -> None:
    current = dest
    for part in parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise ArtifactError(f"{shown}: unsafe entry {name!r}: goes through a symlink")
        if not current.exists():
            current.mkdir()
        elif not current.is_dir():
            raise ArtifactError(f"{shown}: unsafe entry {name!r}: parent is a file")


def _file_mode(mode: int) -> int:
    # Keep the executable bits, drop setuid/setgid/sticky; the owner can always read/write.
    return (mode & 0o777) | 0o600
