"""Artifact store: fetch, verify and unpack each app version into its own directory. I/O shell.

Layout: `<root>/<app>/<version>-<h>/` where h identifies the source (archive sha256, git
url+ref+subdir, or the spec hash for `none`). A version dir is assembled in a `.tmp-*` sibling
and renamed into place only when complete (marker file written last), so a kill -9 never leaves
a half-installed dir that a later start would use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from reconciler.core.errors import ArtifactError, SourceError
from reconciler.core.redact import redact_url
from reconciler.core.spec import NAME_RE, AppSpec, ArchiveSource, NoSource
from reconciler.core.spec import GitSource as GitSourceSpec
from reconciler.node.source import FULL_SHA_RE, run_git

MARKER = ".gitops-mesh-installed"
_TMP_PREFIX = ".tmp-"
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
        # The one lazy import here: urllib.request, http.client and tarfile would cost every
        # agent start, and only an archive source needs them.
        from reconciler.node import archives

        archives.install(source, dest, read_repo_file, self.timeout, self.limits)

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


def _through_symlink(dest: Path, parts: list[str]) -> bool:
    current = dest
    for part in parts:
        current = current / part
        if current.is_symlink():
            return True
    return False


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
