"""Git source: a bare cache of the spec repo, change detection, tree reads, signatures. I/O shell.

Blocking API: the agent calls it through `asyncio.to_thread`. Network commands (ls-remote,
fetch) run the git CLI in their own process group so a timeout kills git *and* its transport
helpers (ssh, git-remote-https); objects are read through GitPython from the local cache, never
from a work tree (there is none).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from git import BadName, Repo
from git.exc import GitError
from git.objects import Blob, Tree

from reconciler.errors import ArtifactError, SignatureError, SourceError
from reconciler.loader import SpecFile

log = logging.getLogger(__name__)

FULL_SHA_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
SPEC_SUFFIXES = (".yaml", ".yml")
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_REGULAR_FILE_MODES = (0o100644, 0o100755)
# Roughly `git check-ref-format`: no option-like start, no spaces, no ~^:?*[\ or control chars.
_REF_NAME_RE = re.compile(r"^[^-\s~^:?*\[\\\x00-\x1f\x7f][^\s~^:?*\[\\\x00-\x1f\x7f]*$")
# Lock files a killed git leaves behind; nothing else uses the cache, so at start they are stale.
_STALE_LOCKS = ("packed-refs.lock", "shallow.lock", "config.lock", "HEAD.lock")
# Run `git gc --auto` after this many successful fetches; fetch itself passes --no-auto-gc so
# a long repack can never eat the fetch timeout and turn into an endless SourceError loop.
_GC_EVERY = 50


def redact_url(text: str) -> str:
    """Strip `user:password@` from every URL in `text` (messages, logs, events)."""
    return _USERINFO_RE.sub(r"\g<scheme>", text)


def _is_local_path(url: str) -> bool:
    # git's own rule: no "scheme://" and no colon before the first slash (scp-like host:path).
    return "://" not in url and ":" not in url.split("/", 1)[0]


def _git_env() -> dict[str, str]:
    env = {**os.environ, "LC_ALL": "C", "LANGUAGE": "C", "GIT_TERMINAL_PROMPT": "0"}
    # An agent has no terminal: never wait for a password or a host-key question.
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    return env


@dataclass(frozen=True)
class GitResult:
    returncode: int
    stdout: str
    stderr: str


def run_git(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    what: str = "git",
) -> GitResult:
    """Run `git args...`; kill its whole process group after `timeout` -> SourceError."""
    with subprocess.Popen(
        ["git", *args],
        cwd=cwd,
        env=env or _git_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,  # own process group: the timeout kills helpers too
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            raise SourceError(f"{what} timed out after {timeout:g}s") from None
        except BaseException:
            _kill_group(proc)
            raise
    return GitResult(proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _first_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in lines:
        if line.startswith(("fatal:", "error:")):
            return line.split(":", 1)[1].strip()
    return lines[-1] if lines else "no error output"


@dataclass(frozen=True)
class SignatureVerifier:
    """Which commit signers are trusted.

    `allowed_signers`: an ssh allowed_signers file (`principal key-type base64-key` lines).
    `gpg_keyring`: a file of exported OpenPGP public keys (binary or armored); imported into a
    private GNUPGHOME next to the cache, so the user's own keyring is never consulted.
    `gpg_home`: an existing GNUPGHOME whose public keys are all trusted (instead of a keyring).
    """

    allowed_signers: Path | None = None
    gpg_keyring: Path | None = None
    gpg_home: Path | None = None

    def __post_init__(self) -> None:
        for field in ("allowed_signers", "gpg_keyring", "gpg_home"):  # accept str paths too
            value = getattr(self, field)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, field, Path(value))
        if not (self.allowed_signers or self.gpg_keyring or self.gpg_home):
            raise ValueError("a SignatureVerifier needs allowed_signers, gpg_keyring or gpg_home")
        if self.gpg_keyring and self.gpg_home:
            raise ValueError("give gpg_keyring or gpg_home, not both")
        for path in (self.allowed_signers, self.gpg_keyring, self.gpg_home):
            if path is not None and not path.exists():
                raise ValueError(f"{path}: no such file or directory")

    def stamp(self) -> tuple[tuple[int, int], ...]:
        """Changes when a trust file is edited: cached verdicts are then checked again."""
        stamps = []
        for path in (self.allowed_signers, self.gpg_keyring, self.gpg_home):
            try:
                st = path.stat() if path is not None else None
            except OSError:
                st = None
            stamps.append((st.st_mtime_ns, st.st_size) if st else (0, -1))
        return tuple(stamps)

    @property
    def trusts_gpg(self) -> bool:
        return self.gpg_keyring is not None or self.gpg_home is not None


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
        self._lock = threading.RLock()
        self._fetches = 0
        self._gnupg_home: Path | None = None
        self._verified: dict[str, tuple[tuple[tuple[int, int], ...], str]] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def display_url(self) -> str:
        return redact_url(self.url)

    def close(self) -> None:
        with self._lock:
            if self._repo is not None:
                self._repo.close()  # ends GitPython's persistent `git cat-file` processes
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
                except GitError as exc2:
                    raise SourceError(
                        f"git cache {self.cache_dir} is unusable: {exc2}"
                    ) from exc2
            self._remove_stale_locks()
        return self._repo

    def _open_cache(self) -> Repo:
        if not (self.cache_dir / "objects").is_dir() or not (self.cache_dir / "HEAD").is_file():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            res = run_git(["init", "-q", "--bare", str(self.cache_dir)], timeout=30)
            if res.returncode != 0:
                raise SourceError(
                    f"cannot create git cache {self.cache_dir}: {_first_error_line(res.stderr)}"
                )
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
        reason = redact_url(_first_error_line(res.stderr))
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
        res = self._git("rev-parse", "--verify", "-q", rev + "^{commit}")
        return res.stdout.strip() if res.returncode == 0 else None

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
            if res.returncode != 0:
                if "couldn't find remote ref" in res.stderr and not self.pinned:
                    self._remote_ref = None  # it may have become a tag, or been deleted
                raise self._fail("fetch", res)
            self._after_fetch()
            sha = self.branch if self.pinned else self._resolve(self.local_ref or "")
            if sha is None or not self._has_commit(sha):
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
                            _first_error_line(res.stderr))

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
            if not revision or revision.startswith("-"):
                raise ValueError(revision)
            return repo.commit(revision).tree
        except (BadName, ValueError, GitError) as exc:
            raise SourceError(
                f"revision {revision} is not in the cache of {self.display_url}"
            ) from exc

    def spec_files(self, revision: str, apps_path: str = "apps") -> list[SpecFile]:
        """Every regular *.yaml / *.yml file below `apps_path` at `revision`, read from the
        commit's tree (no checkout), sorted by path. A missing apps_path gives []."""
        with self._lock:
            tree = self._commit_tree(revision)
            sub = _subtree(tree, apps_path)
            if sub is None:
                return []
            files = [
                SpecFile(path=str(item.path), data=item.data_stream.read(), key=item.hexsha)
                for item in sub.traverse()
                if isinstance(item, Blob)
                and item.mode in _REGULAR_FILE_MODES
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
                raise SourceError(f"diff {old}..{new} failed: {_first_error_line(res.stderr)}")
            return {p for p in res.stdout.split("\0") if p}

    def read_file(self, revision: str, path: str) -> bytes:
        """A repo-relative file's bytes at `revision` (an artifact archive kept in the repo).
        Paths that are absolute or climb out with `..` are refused (ArtifactError)."""
        clean = _safe_repo_path(path)
        with self._lock:
            tree = self._commit_tree(revision)
            try:
                item = tree / clean
            except KeyError:
                raise ArtifactError(
                    f"{path}: no such file in {self.display_url} at {revision[:12]}"
                ) from None
            if not isinstance(item, Blob):
                raise ArtifactError(f"{path}: not a file in the repository at {revision[:12]}")
            if item.mode not in _REGULAR_FILE_MODES:
                raise ArtifactError(f"{path}: a symlink or special entry, not a regular file")
            return bytes(item.data_stream.read())

    # -- signatures --------------------------------------------------------------------------

    def verify(self, revision: str) -> str:
        """Check `revision`'s signature against the verifier; return a short description of
        the signer. Without a verifier this does nothing (returns ""). Raises SignatureError
        for unsigned commits and commits signed by keys that are not trusted."""
        verifier = self.verifier
        if verifier is None:
            return ""
        with self._lock:
            stamp = verifier.stamp()
            cached = self._verified.get(revision)
            if cached is not None and cached[0] == stamp:
                return cached[1]  # a commit's signature never changes; only trust files do
            if self._resolve(revision) is None:
                raise SourceError(f"revision {revision} is not in the cache of {self.display_url}")
            header = self._git("cat-file", "commit", revision).stdout.split("\n\n", 1)[0]
            kind = _signature_kind(header)
            short = revision[:12]
            if kind is None:
                raise SignatureError(f"commit {short} is not signed")
            if kind == "ssh" and verifier.allowed_signers is None:
                raise SignatureError(
                    f"commit {short} has an SSH signature but no allowed_signers file is trusted"
                )
            if kind == "gpg" and not verifier.trusts_gpg:
                raise SignatureError(
                    f"commit {short} has a GPG signature but only SSH signers are trusted"
                )
            if kind == "x509":
                raise SignatureError(f"commit {short} has an X.509 signature (not supported)")
            env = _git_env()
            config = ["-c", "gpg.ssh.program=ssh-keygen"]
            if verifier.allowed_signers is not None:
                signers = verifier.allowed_signers.absolute()
                config += ["-c", f"gpg.ssh.allowedSignersFile={signers}"]
            if kind == "gpg":
                env["GNUPGHOME"] = str(self._gnupg_dir(verifier))
                config += ["-c", "gpg.program=gpg"]
            res = run_git(
                [*config, "verify-commit", "--raw", revision], cwd=self.cache_dir, env=env,
                timeout=60, what="verify-commit",
            )
            if res.returncode != 0:
                detail = _signature_failure(res.stderr)
                raise SignatureError(
                    f"commit {short} is signed by a key that is not trusted ({kind}): {detail}"
                )
            signer = _signer(kind, res.stderr)
            if len(self._verified) > 64:
                self._verified.clear()
            self._verified[revision] = (stamp, signer)
            return signer

    def _gnupg_dir(self, verifier: SignatureVerifier) -> Path:
        if verifier.gpg_home is not None:
            return verifier.gpg_home.absolute()
        assert verifier.gpg_keyring is not None
        keys = verifier.gpg_keyring.read_bytes()
        digest = hashlib.sha256(keys).hexdigest()
        home = self.cache_dir / "gitops-gnupg"
        stamp = home / "imported.sha256"
        if self._gnupg_home == home and stamp.exists() and stamp.read_text() == digest:
            return home
        # Rebuild from scratch when the keyring changes: a removed key must stop verifying.
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(mode=0o700, parents=True)
        proc = subprocess.run(
            ["gpg", "--batch", "--quiet", "--homedir", str(home), "--import"],
            input=keys, capture_output=True, timeout=60, check=False,
        )
        if proc.returncode != 0:
            shutil.rmtree(home, ignore_errors=True)
            raise SignatureError(
                f"cannot import GPG keyring {verifier.gpg_keyring}: "
                f"{_first_error_line(proc.stderr.decode(errors='replace'))}"
            )
        stamp.write_text(digest)
        self._gnupg_home = home
        return home


def _signature_kind(commit_header: str) -> str | None:
    match = re.search(r"^gpgsig(?:-sha256)? (.*)$", commit_header, re.MULTILINE)
    if match is None:
        return None
    first = match.group(1)
    if "BEGIN SSH SIGNATURE" in first:
        return "ssh"
    if "BEGIN PGP SIGNATURE" in first:
        return "gpg"
    return "x509"


def _signature_failure(stderr: str) -> str:
    for line in stderr.splitlines():
        text = line.strip()
        if text.startswith("[GNUPG:] ERRSIG"):
            return "no trusted public key for this signature"
        if text.startswith(("[GNUPG:] BADSIG", "Signature verification failed")):
            return "bad signature"
        if text.startswith(("[GNUPG:] EXPKEYSIG", "[GNUPG:] REVKEYSIG")):
            return "key expired or revoked"
    if "No principal matched" in stderr:
        match = re.search(r"key (SHA256:\S+)", stderr)
        return f"{match.group(1) if match else 'the key'} is not in allowed_signers"
    return _first_error_line(stderr)


def _signer(kind: str, stderr: str) -> str:
    if kind == "ssh":
        match = re.search(r'Good "git" signature for (\S+) with (\S+) key (\S+)', stderr)
        return f"ssh:{match.group(1)} {match.group(3)}" if match else "ssh"
    match = re.search(r"^\[GNUPG:\] VALIDSIG (\S+)", stderr, re.MULTILINE)
    return f"gpg:{match.group(1)}" if match else "gpg"


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
