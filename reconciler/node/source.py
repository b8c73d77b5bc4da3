"""Git source: a bare cache of the spec repo, change detection, tree reads, signatures. I/O shell.

Blocking API: the agent calls it through `asyncio.to_thread`. Network commands (ls-remote,
fetch) run the git CLI (gitcmd.run_git) in their own process group so a timeout kills git *and*
its transport helpers (ssh, git-remote-https). Revisions, commits, trees and blobs are read
from the local cache through GitPython (never from a work tree: there is none); its object
database runs one `git cat-file --batch` (and `--batch-check`) for all reads, ended by close().
Commit signatures: signatures.CommitSignatures.
"""

from __future__ import annotations

import logging
import posixpath
import re
import shutil
import threading
from pathlib import Path
from types import TracebackType

from git import Repo
from git.exc import GitError, ODBError
from git.objects import Blob, Tree

from reconciler.core.errors import ArtifactError, SourceError
from reconciler.core.loader import SpecFile
from reconciler.core.redact import redact_url
from reconciler.node.gitcmd import GitResult, first_error_line, run_git
from reconciler.node.signatures import MAX_VERIFIED_COMMITS, CommitSignatures, SignatureVerifier

__all__ = ["FULL_SHA_RE", "MAX_VERIFIED_COMMITS", "GitSource", "SignatureVerifier", "run_git"]

log = logging.getLogger(__name__)

FULL_SHA_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
SPEC_SUFFIXES = (".yaml", ".yml")
ANCESTRY_TIMEOUT_S = 10.0  # one `git merge-base --is-ancestor` (local, normally milliseconds)
_REGULAR_FILE_MODES = (0o100644, 0o100755)
# Roughly `git check-ref-format`: no option-like start, no spaces, no ~^:?*[\ or control chars.
_REF_NAME_RE = re.compile(r"^[^-\s~^:?*\[\\\x00-\x1f\x7f][^\s~^:?*\[\\\x00-\x1f\x7f]*$")
# Lock files a killed git leaves behind; nothing else uses the cache, so at start they are stale.
_STALE_LOCKS = ("packed-refs.lock", "shallow.lock", "config.lock", "HEAD.lock")
# Run `git gc --auto` after this many successful fetches; fetch itself passes --no-auto-gc so
# a long repack can never eat the fetch timeout and turn into an endless SourceError loop.
_GC_EVERY = 50


def _is_local_path(url: str) -> bool:
    # git's own rule: no "scheme://" and no colon before the first slash (scp-like host:path).
    return "://" not in url and ":" not in url.split("/", 1)[0]


class GitSource:
    """One tracked ref (branch, tag or pinned commit) of a spec repository, cached bare."""

    def __init__(
        self,
        url: str,
        branch: str,
        cache_dir: Path,
        fetch_timeout: float = 30.0,
        verifier: SignatureVerifier | None = None,
    ) -> None:
        if not _REF_NAME_RE.match(branch) or ".." in branch or branch.endswith((".lock", "/")):
            raise ValueError(f"invalid branch, tag or commit {branch!r}")
        if url.startswith("-"):
            raise ValueError(f"invalid repository URL {redact_url(url)!r}")
        # git runs with cwd=cache_dir, so a relative local path must be made absolute first.
        self.url = str(Path(url).absolute()) if _is_local_path(url) else url
        self.branch = branch
        self.cache_dir = Path(cache_dir).absolute()
        self.fetch_timeout = fetch_timeout
        self.verifier = verifier
        self.pinned = bool(FULL_SHA_RE.match(branch))
        self._remote_ref: str | None = "HEAD" if branch == "HEAD" else (
            branch if branch.startswith("refs/") else None
        )
        self._repo: Repo | None = None
        self._empty = False  # a cache this process just made: no commit to look up in it
        self._lock = threading.RLock()
        self._fetches = 0
        self._signatures = None if verifier is None else CommitSignatures(
            verifier, self.cache_dir, self.display_url, git=self._git, resolve=self._resolve,
            fail=self._fail)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def display_url(self) -> str:
        return redact_url(self.url)

    def close(self) -> None:
        """End GitPython's `git cat-file` processes; the next call opens the cache again."""
        with self._lock:
            if self._repo is not None:
                self._repo.close()
                self._repo = None

    def __enter__(self) -> GitSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _repo_or_init(self) -> Repo:
        if self._repo is None:
            try:
                self._repo = self._open_cache()
            except (GitError, SourceError) as exc:
                # The cache is only a cache: a half-made one (killed during init) is rebuilt.
                log.warning("git cache %s is unusable (%s); recreating it", self.cache_dir, exc)
                shutil.rmtree(self.cache_dir, ignore_errors=True)
                try:
                    self._repo = self._open_cache()
                except GitError as again:
                    raise SourceError(
                        f"git cache {self.cache_dir} is unusable: {again}") from again
            self._remove_stale_locks()
        return self._repo

    def _open_cache(self) -> Repo:
        """The bare repository at cache_dir (git's own test: objects/, refs/ and HEAD), made if
        there is none yet; SourceError when one is half there or cannot be made."""
        parts = [(self.cache_dir / "objects").is_dir(), (self.cache_dir / "refs").is_dir(),
                 (self.cache_dir / "HEAD").is_file()]
        if all(parts):
            return Repo(self.cache_dir)
        if any(parts):
            raise SourceError(f"git cache {self.cache_dir} is not a git repository")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        res = run_git(["init", "-q", "--bare", str(self.cache_dir)], timeout=30)
        if res.returncode != 0:
            raise SourceError(
                f"cannot create git cache {self.cache_dir}: {first_error_line(res.stderr)}")
        self._empty = True
        return Repo(self.cache_dir)

    def _remove_stale_locks(self) -> None:
        # Runs once per process, before our first git command on the cache: a lock that exists
        # now was left by a git we (or a predecessor) had killed, e.g. at a fetch timeout.
        locks = [self.cache_dir / name for name in _STALE_LOCKS]
        locks += (self.cache_dir / "refs" / "gitops").rglob("*.lock")
        for lock in locks:
            if lock.is_file():
                log.warning("removing stale git lock %s", lock)
                lock.unlink(missing_ok=True)

    def reset_cache(self) -> None:
        """Delete the local cache; the next fetch clones again (for a corrupted cache)."""
        with self._lock:
            self.close()
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def _git(self, *args: str, timeout: float | None = None, what: str = "git") -> GitResult:
        self._repo_or_init()
        return run_git(args, cwd=self.cache_dir, timeout=timeout, what=what)

    def _fail(self, what: str, res: GitResult) -> SourceError:
        reason = redact_url(first_error_line(res.stderr))
        return SourceError(f"{what} {self.display_url} ({self.branch}) failed: {reason}")

    # -- remote ------------------------------------------------------------------------------

    @property
    def local_ref(self) -> str | None:
        """The ref in the cache that holds the tracked commit (None until the remote ref's
        kind, branch or tag, is known)."""
        if self.pinned:
            # A ref keeps the fetched commit reachable, so `git gc` never prunes it.
            return f"refs/gitops/pinned/{self.branch}"
        if self._remote_ref is None:
            return None
        return "refs/gitops/" + self._remote_ref.removeprefix("refs/")

    def _ls_remote(self) -> dict[str, str]:
        if self._remote_ref is not None:
            patterns = [self._remote_ref]
            if self._remote_ref.startswith("refs/tags/"):
                patterns.append(self._remote_ref + "^{}")
        else:
            patterns = [
                f"refs/heads/{self.branch}", f"refs/tags/{self.branch}",
                f"refs/tags/{self.branch}^{{}}",
            ]
        res = self._git(
            "ls-remote", "--", self.url, *patterns,
            timeout=self.fetch_timeout, what=f"ls-remote {self.display_url}",
        )
        if res.returncode != 0:
            raise self._fail("ls-remote", res)
        refs: dict[str, str] = {}
        for line in res.stdout.splitlines():
            sha, _, name = line.partition("\t")
            if name:
                refs[name] = sha
        return refs

    def remote_revision(self) -> str | None:
        """The commit the remote ref points at now (cheap: one ls-remote), None if the ref does
        not exist there. A pinned sha is returned as is, without network."""
        if self.pinned:
            return self.branch
        with self._lock:
            refs = self._ls_remote()
            if self._remote_ref is None:
                # Like git: a branch wins over a tag of the same name.
                for candidate in (f"refs/heads/{self.branch}", f"refs/tags/{self.branch}"):
                    if candidate in refs:
                        self._remote_ref = candidate
                        break
                else:
                    return None
            ref = self._remote_ref
            return refs.get(ref + "^{}") or refs.get(ref)

    def local_revision(self) -> str | None:
        """The commit the cache holds for the tracked ref, None before the first fetch."""
        with self._lock:
            if self.pinned:
                return self.branch if self._has_commit(self.branch) else None
            if self.local_ref is None:
                return None
            return self._resolve(self.local_ref)

    def _resolve(self, rev: str) -> str | None:
        if not rev or rev.startswith("-"):  # never let a revision be read as an option
            return None
        repo = self._repo_or_init()
        if self._empty:  # the first start: nothing to look up before the first fetch
            return None
        try:
            commit = repo.rev_parse(rev + "^{commit}")
            # GitPython takes a full sha (the all-zero one too) without looking it up; the
            # object database's has_object() would only see loose objects, info() asks git
            repo.odb.info(commit.binsha)
        except (ODBError, GitError, ValueError):  # unknown, ambiguous, or not a commit
            return None
        return commit.hexsha

    def _has_commit(self, sha: str) -> bool:
        return self._resolve(sha) == sha

    def fetch(self) -> str:
        """Fetch the tracked ref (forced: rewritten history replaces the old) and return its
        commit sha. Never merges. A pinned sha already in the cache needs no network."""
        with self._lock:
            self._repo_or_init()
            if self.pinned:
                if self._has_commit(self.branch):
                    return self.branch
                refspec = f"{self.branch}:{self.local_ref}"
            else:
                if self._remote_ref is None and self.remote_revision() is None:
                    raise SourceError(
                        f"{self.display_url} has no branch or tag named {self.branch!r}"
                    )
                assert self._remote_ref is not None and self.local_ref is not None
                refspec = f"+{self._remote_ref}:{self.local_ref}"
            res = self._git(
                "-c", "fetch.writeCommitGraph=false", "fetch", "--quiet", "--no-tags",
                "--no-auto-gc", "--no-write-fetch-head", "--", self.url, refspec,
                timeout=self.fetch_timeout, what=f"fetch {self.display_url}",
            )
            if res.returncode == 0:
                self._empty = False
            else:
                if "couldn't find remote ref" in res.stderr and not self.pinned:
                    self._remote_ref = None  # it may have become a tag, or been deleted
                raise self._fail("fetch", res)
            self._after_fetch()
            # _resolve gives a commit or None: only a pinned sha needs its own check
            sha = self.branch if self.pinned else self._resolve(self.local_ref or "")
            if sha is None or (self.pinned and not self._has_commit(sha)):
                raise SourceError(
                    f"fetch {self.display_url} ({self.branch}) did not yield a commit"
                )
            return sha

    def _after_fetch(self) -> None:
        self._fetches += 1
        if self._fetches % _GC_EVERY == 0:
            try:
                res = self._git(
                    "-c", "gc.autoDetach=false", "gc", "--auto", "--quiet",
                    timeout=max(120.0, 4 * self.fetch_timeout), what="git gc",
                )
            except SourceError as exc:  # housekeeping: the fetch itself succeeded
                log.warning("git gc --auto in %s: %s", self.cache_dir, exc)
                return
            if res.returncode != 0:
                log.warning("git gc --auto in %s failed: %s", self.cache_dir,
                            first_error_line(res.stderr))

    def poll(self) -> str:
        """remote_revision(); fetch only when it differs from the cache. Returns the commit."""
        with self._lock:
            if self.pinned:
                return self.fetch()
            remote = self.remote_revision()
            if remote is None:
                raise SourceError(
                    f"{self.display_url} has no branch or tag named {self.branch!r}"
                )
            if remote == self.local_revision():
                return remote
            return self.fetch()

    # -- reading -----------------------------------------------------------------------------

    def _commit_tree(self, revision: str) -> Tree:
        repo = self._repo_or_init()
        try:
            if not revision or revision.startswith("-"):  # never let a revision be an option
                raise ValueError(revision)
            return repo.commit(revision).tree
        except (ODBError, GitError, ValueError) as exc:
            raise SourceError(
                f"revision {revision} is not in the cache of {self.display_url}") from exc

    def spec_files(self, revision: str, apps_path: str = "apps") -> list[SpecFile]:
        """Every regular *.yaml / *.yml file below `apps_path` at `revision`, read from the
        commit's tree (no checkout), sorted by path. A missing apps_path gives []."""
        with self._lock:
            sub = _subtree(self._commit_tree(revision), apps_path)
            if sub is None:
                return []
            files = [
                SpecFile(path=str(item.path), data=item.data_stream.read(), key=item.hexsha)
                for item in sub.traverse()
                if isinstance(item, Blob) and item.mode in _REGULAR_FILE_MODES
                and item.name.endswith(SPEC_SUFFIXES)
            ]
        return sorted(files, key=lambda f: f.path)

    def changed_paths(self, old: str, new: str, apps_path: str = "apps") -> set[str]:
        """Repo-relative paths below `apps_path` that differ between two revisions (added,
        removed or modified; both sides of a rename)."""
        prefix = _norm_dir(apps_path)
        with self._lock:
            for rev in (old, new):
                if self._resolve(rev) is None:
                    raise SourceError(f"revision {rev} is not in the cache of {self.display_url}")
            args = ["diff-tree", "-r", "-z", "--no-renames", "--name-only", old, new]
            if prefix:
                args += ["--", prefix]
            res = self._git(*args)
            if res.returncode != 0:
                raise SourceError(f"diff {old}..{new} failed: {first_error_line(res.stderr)}")
            return {p for p in res.stdout.split("\0") if p}

    def ancestors_among(self, revision: str, candidates: list[str]) -> set[str]:
        """Which of `candidates` (other nodes' revisions, as their statuses say: checked to be
        full SHAs before they reach git) are earlier commits of `revision` in this cache; a
        commit of another repository is not here, so it is not one."""
        found: set[str] = set()
        with self._lock:  # as every reader: a close() meanwhile must not see it reopen
            for candidate in candidates:
                if candidate == revision or not FULL_SHA_RE.match(candidate):
                    continue
                res = self._git("merge-base", "--is-ancestor", candidate, revision,
                                timeout=ANCESTRY_TIMEOUT_S, what="git merge-base")
                if res.returncode == 0:
                    found.add(candidate)
        return found

    def read_file(self, revision: str, path: str, max_bytes: int | None = None) -> bytes:
        """A repo-relative file's bytes at `revision` (an artifact archive kept in the repo).
        Paths that are absolute or climb out with `..` are refused (ArtifactError), and so
        are files larger than `max_bytes` when given (checked before reading)."""
        clean = _safe_repo_path(path)
        with self._lock:
            try:
                item = self._commit_tree(revision) / clean
            except KeyError:
                raise ArtifactError(
                    f"{path}: no such file in {self.display_url} at {revision[:12]}"
                ) from None
            if not isinstance(item, Blob):
                raise ArtifactError(f"{path}: not a file in the repository at {revision[:12]}")
            if item.mode not in _REGULAR_FILE_MODES:
                raise ArtifactError(f"{path}: a symlink or special entry, not a regular file")
            if max_bytes is not None and item.size > max_bytes:
                raise ArtifactError(f"{path}: larger than {max_bytes} bytes; refused")
            return bytes(item.data_stream.read())

    def verify(self, revision: str) -> str:
        """Check `revision`'s signature (signatures.CommitSignatures.verify); without a
        verifier this does nothing (returns "")."""
        if self._signatures is None:
            return ""
        with self._lock:
            return self._signatures.verify(revision)

    def verify_move(self, applied: str | None, new: str, allow_rewind: bool = False) -> None:
        """Before the node moves from `applied` to `new`: every commit in between verifies,
        and a move back is refused unless `allow_rewind`
        (signatures.CommitSignatures.verify_move); without a verifier it does nothing."""
        if self._signatures is None:
            return
        with self._lock:
            self._signatures.verify_move(applied, new, allow_rewind)


def _norm_dir(apps_path: str) -> str:
    clean = posixpath.normpath(apps_path.strip().strip("/")) if apps_path.strip("/ ") else ""
    return "" if clean == "." else clean


def _subtree(tree: Tree, apps_path: str) -> Tree | None:
    prefix = _norm_dir(apps_path)
    if not prefix:
        return tree
    try:
        item = tree / prefix
    except KeyError:
        return None
    return item if isinstance(item, Tree) else None


def _safe_repo_path(path: str) -> str:
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise ArtifactError(f"{path!r}: not a repo-relative path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ArtifactError(f"{path!r}: path escapes the repository")
    return "/".join(parts)
