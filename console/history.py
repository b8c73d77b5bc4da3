"""Revision history for the console: a read-only bare cache clone of the spec repo, read with `git`.

Each commit of the followed branch with its subject, author, time and the apps it changed
(the `name` of every app document in a changed file under `apps/`, before and after).
Every git call is a subprocess without a shell, with a timeout and no terminal prompt;
commits are immutable, so what was read once for a revision is kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from reconciler.core.events import iso_time
from reconciler.core.redact import redact_url

APPS_DIR = "apps/"
SPEC_SUFFIXES = (".yaml", ".yml")
MAX_SPEC_BYTES = 1 << 20  # a bigger file is named by its path, not parsed
_BRANCH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,200}")
_SHA_RE = re.compile(r"[0-9a-f]{4,64}")


class HistoryError(RuntimeError):
    """git failed or timed out (the message is safe to show: no URL credentials)."""


@dataclass
class GitHistory:
    """The history of `branch` (default: the remote's HEAD) of the repo at `url`."""

    url: str
    branch: str | None = None
    cache_dir: Path | None = None  # None: a temporary directory, removed by close()
    timeout: float = 30.0
    limit: int = 100
    refreshed_at: datetime | None = None
    last_error: str | None = None
    _commits: list[dict[str, Any]] = field(default_factory=list)
    _by_rev: dict[str, dict[str, Any]] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.branch is not None and not _BRANCH_RE.fullmatch(self.branch):
            raise ValueError(f"--branch {self.branch!r} is not a branch name")
        if self.url.startswith("-"):
            raise ValueError(f"--repo {self.url!r} is not a repository URL")

    @property
    def repo(self) -> str:
        return redact_url(self.url)

    def _dir(self) -> Path:
        if self.cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gitops-console-history-")
            self.cache_dir = Path(self._tmp.name) / "repo.git"
        return self.cache_dir

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ---- git ----------------------------------------------------------------------------

    def _git(self, *args: str, stdin: bytes | None = None, cwd: bool = True) -> bytes:
        command = ["git", *(("-C", str(self._dir())) if cwd else ()), *args]
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true",
               "LC_ALL": "C"}
        try:
            done = subprocess.run(command, input=stdin, capture_output=True, env=env,
                                  timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise HistoryError(f"git {args[0]} of {self.repo} took more than "
                               f"{self.timeout:g}s") from None
        except OSError as exc:
            raise HistoryError(f"cannot run git: {exc}") from None
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            why = redact_url(lines[-1]) if lines else f"exit {done.returncode}"
            raise HistoryError(f"git {args[0]} of {self.repo}: {why}")
        return done.stdout

    def refresh(self, now: datetime | None = None) -> None:
        """Clone (the first time) or fetch, then read the new commits. Thread-safe; on
        failure the last known history stays and `last_error` says why."""
        with self._lock:
            try:
                self._fetch()
                self._read()
            except HistoryError as exc:
                self.last_error = str(exc)
                return
            self.last_error = None
            self.refreshed_at = now or datetime.now(UTC)

    def _fetch(self) -> None:
        target = self._dir()
        if not (target / "HEAD").exists():
            if target.exists():
                shutil.rmtree(target)  # a clone that was cut off half way
            target.parent.mkdir(parents=True, exist_ok=True)
            branch = ("--single-branch", "--branch", self.branch) if self.branch else ()
            self._git("clone", "--bare", "--quiet", "--no-tags", *branch, "--", self.url,
                      str(target), cwd=False)
            return
        refspec = (f"+refs/heads/{self.branch}:refs/heads/{self.branch}" if self.branch
                   else "+refs/heads/*:refs/heads/*")
        self._git("fetch", "--quiet", "--prune", "--no-tags", "--", self.url, refspec)

    def _read(self) -> None:
        ref = f"refs/heads/{self.branch}" if self.branch else "HEAD"
        raw = self._git("log", "--first-parent", "-m", "--no-renames", "--name-status",
                        f"-n{self.limit}", "--format=%x1e%H%x1f%P%x1f%an%x1f%aI%x1f%s", ref,
                        "--")
        commits = []
        for chunk in raw.decode(errors="replace").split("\x1e")[1:]:
            head, _, rest = chunk.partition("\n")
            sha, parents, author, when, subject = (head.split("\x1f") + [""] * 5)[:5]
            known = self._by_rev.get(sha)
            if known is None:
                changes = [line.split("\t", 1) for line in rest.splitlines() if "\t" in line]
                parent = parents.split()[0] if parents.split() else None
                known = {
                    "revision": sha, "subject": subject, "author": author,
                    "time": _iso(when), "parent": parent,
                    "files": sorted(path for _, path in changes),
                    "apps": self._apps_changed(sha, parent, changes),
                }
                self._by_rev[sha] = known
            commits.append(known)
        self._commits = commits
        keep = {c["revision"] for c in commits}
        for sha in [s for s in self._by_rev if s not in keep]:
            del self._by_rev[sha]

    def _apps_changed(self, sha: str, parent: str | None,
                      changes: list[list[str]]) -> list[str]:
        """Names of the apps defined in the changed spec files, on either side."""
        wanted = []
        for status, path in changes:
            if not (path.startswith(APPS_DIR) and path.endswith(SPEC_SUFFIXES)):
                continue
            if not status.startswith("D"):
                wanted.append(f"{sha}:{path}")
            if parent and not status.startswith("A"):
                wanted.append(f"{parent}:{path}")
        if not wanted:
            return []
        out = self._git("cat-file", "--batch", stdin="".join(f"{w}\n" for w in wanted).encode())
        names: set[str] = set()
        for spec, text in zip(wanted, _batch_bodies(out), strict=False):
            found = _app_names(text)
            names.update(found or [Path(spec.split(":", 1)[1]).stem])
        return sorted(names)

    # ---- views --------------------------------------------------------------------------

    def commits(self, limit: int | None = None) -> list[dict[str, Any]]:
        return self._commits[:limit] if limit else list(self._commits)

    def commit(self, revision: str) -> dict[str, Any] | None:
        """The commit of a full revision or a unique prefix (at least 4 hex digits)."""
        if not _SHA_RE.fullmatch(revision):
            return None
        hit = self._by_rev.get(revision)
        if hit is not None:
            return hit
        found = [c for s, c in self._by_rev.items() if s.startswith(revision)]
        return found[0] if len(found) == 1 else None

    def view(self, revision: str | None = None, limit: int = 100) -> dict[str, Any]:
        return {
            "repo": self.repo, "branch": self.branch,
            "refreshed_at": iso_time(self.refreshed_at) if self.refreshed_at else None,
            "error": self.last_error,
            "selected": (self.commit(revision) or {}).get("revision") if revision else None,
            "commits": self.commits(limit),
        }


def _iso(text: str) -> str | None:
    with contextlib.suppress(ValueError):
        return iso_time(datetime.fromisoformat(text))
    return None


def _batch_bodies(out: bytes) -> list[bytes]:
    """Bodies of `git cat-file --batch` output, in order (b"" for a missing object)."""
    bodies = []
    pos = 0
    while pos < len(out):
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        pos = end + 1
        if len(header) < 3 or header[-1] == b"missing":
            bodies.append(b"")
            continue
        size = int(header[2])
        bodies.append(out[pos:pos + size])
        pos += size + 1
    return bodies


def _app_names(text: bytes) -> list[str]:
    """The `name` of every app document in a spec file (none if it does not parse)."""
    if not text or len(text) > MAX_SPEC_BYTES:
        return []
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        docs = list(yaml.load_all(text, Loader=loader))
    except (yaml.YAMLError, RecursionError):
        return []
    return [d["name"] for d in docs if isinstance(d, dict) and isinstance(d.get("name"), str)]
