"""Artifact store: fetch, verify and unpack each app version into its own directory. I/O shell.

Layout: `<root>/<app>/<version>-<h>/` where h identifies the source (archive sha256, git
url+ref+subdir, or the spec hash for `none`). A version dir is assembled in a `.tmp-*` sibling
and renamed into place only when complete (marker file written last), so a kill -9 never leaves
a half-installed dir that a later start would use.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from reconciler.errors import ArtifactError, SourceError
from reconciler.source import FULL_SHA_RE, redact_url, run_git
from reconciler.spec import NAME_RE, AppSpec, ArchiveSource, NoSource
from reconciler.spec import GitSource as GitSourceSpec

MARKER = ".gitops-mesh-installed"
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 16
_UNSAFE_VERSION_CHARS = re.compile(r"[^A-Za-z0-9._+-]")

ReadRepoFile = Callable[[str], bytes]


@dataclass(frozen=True)
class Limits:
    """Caps that keep a hostile or broken archive from filling the disk."""

    max_download_bytes: int = 1 << 30
    max_unpacked_bytes: int = 4 << 30
    max_entries: int = 100_000
    max_download_seconds: float = 900.0  # the socket timeout alone lets a slow drip run forever


class ArtifactStore:
    """Installed app versions under `root` (= `<state>/apps`)."""

    def __init__(
        self, root: Path, timeout: float = 60.0, limits: Limits | None = None
    ) -> None:
        self.root = Path(root)
        self.timeout = timeout
        self.limits = limits or Limits()

    # -- paths -------------------------------------------------------------------------------

    def path_for(self, spec: AppSpec) -> Path:
        """Where `spec`'s files are (or will be) installed."""
        version = _UNSAFE_VERSION_CHARS.sub("_", spec.version)[:64]
        return self._app_dir(spec.name) / f"{version}-{source_hash(spec)}"

    def is_installed(self, spec: AppSpec) -> bool:
        return (self.path_for(spec) / MARKER).is_file()

    def _app_dir(self, name: str) -> Path:
        if not NAME_RE.match(name):
            raise ValueError(f"invalid app name {name!r}")
        return self.root / name

    # -- install -----------------------------------------------------------------------------

    def install(self, spec: AppSpec, read_repo_file: ReadRepoFile | None = None) -> Path:
        """Install `spec`'s source into its version dir (idempotent) and return the dir.

        Raises ArtifactError when the artifact is wrong (digest mismatch, unsafe entry, too
        big: a person must fix the spec) and SourceError when it could not be fetched (retry).
        """
        final = self.path_for(spec)
        if (final / MARKER).is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + final.name + "-", dir=final.parent))
        try:
            source = spec.source
            if isinstance(source, ArchiveSource):
                self._install_archive(source, staging, read_repo_file)
            elif isinstance(source, GitSourceSpec):
                self._install_git(source, staging)
            else:
                assert isinstance(source, NoSource)
            _write_marker(staging, spec)
            if final.exists():  # an incomplete dir from an older layout: never use it
                shutil.rmtree(final)
            try:
                os.rename(staging, final)
            except OSError:
                if (final / MARKER).is_file():  # installed meanwhile by someone else
                    return final
                raise
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final

    def _install_archive(
        self, source: ArchiveSource, dest: Path, read_repo_file: ReadRepoFile | None
    ) -> None:
        # The download lands next to dest (same filesystem), outside the tree that is renamed.
        download = dest.with_name(dest.name + ".download")
        try:
            with open(download, "w+b") as fh:
                digest = self._fetch_archive(source.url, fh, read_repo_file)
                if digest != source.sha256:
                    raise ArtifactError(
                        f"{_display(source.url)}: sha256 mismatch: expected {source.sha256}, "
                        f"got {digest}"
                    )
                fh.seek(0)
                unpack(fh, dest, source.strip_components, self.limits, _display(source.url))
        finally:
            download.unlink(missing_ok=True)

    def _fetch_archive(
        self, url: str, out: BinaryIO, read_repo_file: ReadRepoFile | None
    ) -> str:
        """Copy the archive into `out` under the size cap; return its sha256 hex digest."""
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        shown = _display(url)
        if scheme in ("http", "https"):
            try:
                request = _http_request(url)
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    return self._copy(resp, out, shown)
            except urllib.error.HTTPError as exc:
                raise SourceError(f"{shown}: HTTP {exc.code} {exc.reason}") from exc
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise SourceError(f"{shown}: download failed: {reason}") from exc
        if scheme == "file":
            path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
            try:
                with open(path, "rb") as fh:
                    return self._copy(fh, out, shown)
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
        if len(data) > self.limits.max_download_bytes:
            raise ArtifactError(f"{shown}: larger than {self.limits.max_download_bytes} bytes")
        out.write(data)
        out.flush()
        return hashlib.sha256(data).hexdigest()

    def _copy(self, src: IO[bytes], out: BinaryIO, shown: str) -> str:
        digest = hashlib.sha256()
        total = 0
        deadline = time.monotonic() + self.limits.max_download_seconds
        # read1: whatever has arrived, so a slow drip cannot hold one read() past the deadline.
        read = getattr(src, "read1", src.read)
        while chunk := read(_CHUNK):
            if time.monotonic() > deadline:
                raise SourceError(
                    f"{shown}: download took longer than {self.limits.max_download_seconds:g}s"
                )
            total += len(chunk)
            if total > self.limits.max_download_bytes:
                raise ArtifactError(f"{shown}: larger than {self.limits.max_download_bytes} bytes")
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        return digest.hexdigest()

    def _install_git(self, source: GitSourceSpec, dest: Path) -> None:
        clone = dest.with_name(dest.name + ".clone")
        shown = redact_url(source.url)
        try:
            self._clone(source, clone, shown)
            root = clone
            if source.subdir:
                parts = [p for p in source.subdir.split("/") if p not in ("", ".")]
                if ".." in parts or source.subdir.startswith("/"):
                    raise ArtifactError(f"{shown}: subdir {source.subdir!r} escapes the repo")
                root = clone.joinpath(*parts)
                # A symlinked component would make the rename below move a dir outside.
                if _through_symlink(clone, parts) or not root.is_dir():
                    raise ArtifactError(
                        f"{shown}: subdir {source.subdir!r} is not a directory at {source.ref}"
                    )
            shutil.rmtree(root / ".git", ignore_errors=True)
            dest.rmdir()  # empty staging dir: replaced by the checked-out tree
            os.rename(root, dest)
        finally:
            shutil.rmtree(clone, ignore_errors=True)

    def _clone(self, source: GitSourceSpec, clone: Path, shown: str) -> None:
        url = source.url
        if "://" not in url and ":" not in url.split("/", 1)[0]:
            url = str(Path(url).absolute())
        if url.startswith("-"):
            raise ArtifactError(f"{shown}: invalid git URL")

        def git(*args: str, cwd: Path | None = None) -> None:
            res = run_git(args, cwd=cwd, timeout=self.timeout, what=f"git clone {shown}")
            if res.returncode != 0:
                lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
                reason = redact_url(lines[-1].removeprefix("fatal: ") if lines else "failed")
                raise SourceError(f"{shown} at {source.ref}: {reason}")

        if FULL_SHA_RE.match(source.ref):
            # A pinned commit: fetch just that object (servers allow it for protocol v2).
            clone.mkdir()
            git("init", "-q", str(clone))
            git("fetch", "-q", "--depth", "1", "--no-tags", "--", url, source.ref, cwd=clone)
            git("-c", "advice.detachedHead=false", "checkout", "-q", source.ref, cwd=clone)
        elif source.ref == "HEAD":
            git("clone", "-q", "--depth", "1", "--no-tags", "--", url, str(clone))
        else:
            git("-c", "advice.detachedHead=false", "clone", "-q", "--depth", "1", "--no-tags",
                "--branch", source.ref, "--", url, str(clone))

    # -- cleanup -----------------------------------------------------------------------------

    def versions(self, name: str) -> list[Path]:
        """Installed (complete) version dirs of an app."""
        app_dir = self._app_dir(name)
        if not app_dir.is_dir():
            return []
        return sorted(p for p in app_dir.iterdir() if (p / MARKER).is_file())

    def gc(self, name: str, keep: set[Path]) -> list[Path]:
        """Remove the app's version dirs (and leftovers of interrupted installs) that are not
        in `keep`; return what was removed."""
        app_dir = self._app_dir(name)
        if not app_dir.is_dir():
            return []
        kept = {Path(p).absolute() for p in keep}
        removed = []
        for entry in sorted(app_dir.iterdir()):
            if entry.absolute() in kept:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        return removed

    def remove_app(self, name: str) -> None:
        """Remove every installed version of an app."""
        shutil.rmtree(self._app_dir(name), ignore_errors=True)


def source_hash(spec: AppSpec) -> str:
    """Short id of where an app's files come from (the suffix of its version dir)."""
    source = spec.source
    if isinstance(source, ArchiveSource):
        # strip_components changes the layout, so it gets its own dir.
        strip = source.strip_components
        return source.sha256[:12] + (f"s{strip}" if strip else "")
    if isinstance(source, GitSourceSpec):
        ident = "\0".join((source.url, source.ref, source.subdir or ""))
        return hashlib.sha256(ident.encode()).hexdigest()[:12]
    return spec.spec_hash()[:12]


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


def _display(url: str) -> str:
    return redact_url(url)


def _write_marker(dest: Path, spec: AppSpec) -> None:
    info = {"name": spec.name, "version": spec.version, "source": source_hash(spec)}
    path = dest / MARKER
    # The archive may have shipped an entry of that name (even a symlink): never write through.
    _remove_existing(path, "marker", MARKER)
    with _create(path) as fh:
        fh.write(json.dumps(info).encode())
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _through_symlink(dest: Path, parts: list[str]) -> bool:
    current = dest
    for part in parts:
        current = current / part
        if current.is_symlink():
            return True
    return False


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


def _remove_existing(target: Path, shown: str, name: str) -> None:
    if target.is_symlink() or target.is_file():
        target.unlink()  # a later duplicate entry wins, as with tar; never write through a link
    elif target.exists():
        raise ArtifactError(f"{shown}: unsafe entry {name!r}: replaces a directory")


@contextlib.contextmanager
def _create(target: Path) -> Iterator[BinaryIO]:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        yield fh


def _file_mode(mode: int) -> int:
    # Keep the executable bits, drop setuid/setgid/sticky; the owner can always read/write.
    return (mode & 0o777) | 0o600
