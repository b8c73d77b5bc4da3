"""Commit signatures of the spec repository: which signers are trusted, and the checks of
every commit a node moves to (ssh or GPG, through `git verify-commit`). I/O shell."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reconciler.core.errors import RevisionRefused, SignatureError, SourceError
from reconciler.node.gitcmd import GitResult, first_error_line, git_env, run_git

# A signed source verifies every new commit; a longer jump is refused rather than slow.
MAX_VERIFIED_COMMITS = 1000


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


class CommitSignatures:
    """The signature checks on one bare cache. `git(*args)` runs git in the cache, `resolve`
    gives a revision's commit or None, `fail(what, result)` words a failed git command;
    verdicts are kept per commit until a trust file changes. The caller (GitSource) holds
    its lock around every call."""

    def __init__(self, verifier: SignatureVerifier, cache_dir: Path, display_url: str, *,
                 git: Callable[..., GitResult], resolve: Callable[[str], str | None],
                 fail: Callable[[str, GitResult], SourceError]) -> None:
        self.verifier = verifier
        self.cache_dir = cache_dir
        self.display_url = display_url
        self._git = git
        self._resolve = resolve
        self._fail = fail
        self._gnupg_home: Path | None = None
        self._verified: dict[str, tuple[tuple[tuple[int, int], ...], str]] = {}

    def _has_commit(self, sha: str) -> bool:
        return self._resolve(sha) == sha

    def verify(self, revision: str) -> str:
        """Check `revision`'s signature against the verifier; return a short description of
        the signer. Raises SignatureError for unsigned commits and commits signed by keys
        that are not trusted."""
        verifier = self.verifier
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
        env = git_env()
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

    def verify_move(self, applied: str | None, new: str, allow_rewind: bool = False) -> None:
        """Before the node moves from `applied` to `new`, with a verifier: every commit `new`
        adds over `applied` must verify (not only the tip: an unsigned commit below a signed
        one would slip in), and a move back to an ancestor of `applied` (a force-push that
        replays an older signed revision) is refused unless `allow_rewind`. Raises
        SignatureError / RevisionRefused."""
        if applied is None or applied == new or not self._has_commit(applied):
            self.verify(new)  # nothing to compare with: the tip alone
            return
        if self._git("merge-base", "--is-ancestor", new, applied).returncode == 0:
            if not allow_rewind:
                raise RevisionRefused(
                    f"refusing to move back from {applied[:12]} to its ancestor {new[:12]} "
                    "(a force-push replaying an older revision?); start the node with "
                    "--allow-rewind to allow it"
                )
            self.verify(new)
            return
        res = self._git("rev-list", f"--max-count={MAX_VERIFIED_COMMITS + 1}",
                        f"{applied}..{new}", what="rev-list")
        if res.returncode != 0:
            raise self._fail("rev-list", res)
        commits = res.stdout.split()
        if len(commits) > MAX_VERIFIED_COMMITS:
            raise RevisionRefused(
                f"{new[:12]} adds more than {MAX_VERIFIED_COMMITS} commits over "
                f"{applied[:12]}; not verified one by one (apply an intermediate revision)"
            )
        for commit in reversed(commits):  # oldest first: the first bad one is named
            self.verify(commit)

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
                f"{first_error_line(proc.stderr.decode(errors='replace'))}"
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
    return first_error_line(stderr)


def _signer(kind: str, stderr: str) -> str:
    if kind == "ssh":
        match = re.search(r'Good "git" signature for (\S+) with (\S+) key (\S+)', stderr)
        return f"ssh:{match.group(1)} {match.group(3)}" if match else "ssh"
    match = re.search(r"^\[GNUPG:\] VALIDSIG (\S+)", stderr, re.MULTILINE)
    return f"gpg:{match.group(1)}" if match else "gpg"
