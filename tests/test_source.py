"""GitSource against real git repos: fetch, change detection, force-push, tree reads, signatures."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.core.errors import ArtifactError, SignatureError, SourceError
from reconciler.core.loader import SpecFile
from reconciler.core.redact import redact_url
from reconciler.node.source import GitSource, SignatureVerifier
from tests.conftest import SpecRepo, git, make_spec_repo

APP_A = "name: a\nversion: '1'\n"
APP_B = "name: b\nversion: '1'\n"


@pytest.fixture
def repo(tmp_path: Path) -> SpecRepo:
    return make_spec_repo(tmp_path / "specs", {"apps/a.yaml": APP_A})


@pytest.fixture
def source(repo: SpecRepo, tmp_path: Path) -> Iterator[GitSource]:
    with GitSource(repo.url, "main", tmp_path / "cache", fetch_timeout=10) as src:
        yield src


def test_fetch_returns_pushed_sha_and_ls_remote_detects_change(
    repo: SpecRepo, source: GitSource
) -> None:
    assert source.local_revision() is None
    first = repo.head()
    assert source.remote_revision() == first
    assert source.fetch() == first
    assert source.local_revision() == first

    second = repo.commit_and_push("empty change")
    assert source.remote_revision() == second
    assert source.local_revision() == first  # ls-remote alone changes nothing locally
    assert source.poll() == second
    assert source.local_revision() == second
    assert source.poll() == second  # unchanged: no fetch needed, same answer


def test_a_packed_cache_is_read_like_a_loose_one(repo: SpecRepo, tmp_path: Path) -> None:
    """Objects in a pack (a large fetch, or `git gc` every 50 fetches) resolve and read."""
    for i in range(120):  # more objects than git's unpackLimit (100): the fetch keeps a pack
        repo.write(f"apps/many/app{i}.yaml", f"name: app{i}\nversion: '1'\n")
    head = repo.commit_and_push("many apps")
    with GitSource(repo.url, "main", tmp_path / "cache") as source:
        assert source.fetch() == head
        assert len(source.spec_files(head)) == 121
    git(tmp_path / "cache", "gc", "--quiet", "--prune=now")  # every object and ref packed
    with GitSource(repo.url, "main", tmp_path / "cache") as source:
        assert source.poll() == head  # its commit found in the pack
        assert source.local_revision() == head
        assert source.read_file(head, "apps/a.yaml") == APP_A.encode()


def test_force_push_replaces_history(repo: SpecRepo, source: GitSource) -> None:
    base = repo.head()
    repo.write("apps/b.yaml", APP_B)
    doomed = repo.commit_and_push("add b")
    assert source.fetch() == doomed

    git(repo.work, "reset", "-q", "--hard", base)
    repo.write("apps/c.yaml", "name: c\nversion: '1'\n")
    git(repo.work, "add", "-A")
    git(repo.work, "commit", "-q", "-m", "rewritten")
    git(repo.work, "push", "-q", "--force", "origin", "HEAD:main")
    rewritten = repo.head()

    assert source.poll() == rewritten
    assert [f.path for f in source.spec_files(rewritten)] == ["apps/a.yaml", "apps/c.yaml"]


def test_rollback_to_a_cached_commit_is_followed(repo: SpecRepo, source: GitSource) -> None:
    base = repo.head()
    assert source.fetch() == base
    newer = repo.commit_and_push("newer")
    assert source.poll() == newer
    git(repo.work, "push", "-q", "--force", "origin", f"{base}:main")
    assert source.poll() == base


def test_ancestors_among_other_nodes_revisions(repo: SpecRepo, source: GitSource,
                                               tmp_path: Path) -> None:
    """Which revisions other nodes report are earlier commits of ours (rollout membership):
    our history's commits are; a later one, another repository's and junk are not, and
    nothing that is not a full SHA reaches git's command line."""
    first = repo.head()
    second = repo.commit_and_push("second")
    third = repo.commit_and_push("third")
    other = make_spec_repo(tmp_path / "other", {"apps/x.yaml": "name: x\nversion: '2'\n"})
    assert source.fetch() == third
    junk = tmp_path / "written-by-git"
    candidates = [first, second, third, other.head(), "f" * 40, f"--output={junk}", first[:12]]
    assert source.ancestors_among(third, candidates) == {first, second}
    assert source.ancestors_among(second, candidates) == {first}
    assert not junk.exists()


def test_tag_lightweight_and_annotated(repo: SpecRepo, tmp_path: Path) -> None:
    tagged = repo.head()
    git(repo.work, "tag", "v1")
    git(repo.work, "tag", "-a", "v2", "-m", "release 2")
    git(repo.work, "push", "-q", "origin", "v1", "v2")
    repo.commit_and_push("after the tags")
    for tag in ("v1", "v2"):
        with GitSource(repo.url, tag, tmp_path / f"cache-{tag}") as src:
            # The annotated tag resolves to its commit, both remotely and after the fetch.
            assert src.remote_revision() == tagged
            assert src.fetch() == tagged
            assert src.poll() == tagged


@pytest.mark.parametrize("ref", ["HEAD", "refs/heads/main"])
def test_remote_head_and_full_ref_names(ref: str, repo: SpecRepo, tmp_path: Path) -> None:
    with GitSource(repo.url, ref, tmp_path / "cache") as src:
        assert src.poll() == repo.head()
        newer = repo.commit_and_push("newer")
        assert src.remote_revision() == newer
        assert src.poll() == newer


def test_pinned_commit_needs_no_fetch_once_cached(repo: SpecRepo, tmp_path: Path) -> None:
    pinned = repo.head()
    repo.commit_and_push("later")
    with GitSource(repo.url, pinned, tmp_path / "cache") as src:
        assert src.remote_revision() == pinned
        assert src.fetch() == pinned
        shutil.rmtree(repo.bare)  # remote gone: a cached pin still works
        assert src.poll() == pinned
        assert [f.path for f in src.spec_files(pinned)] == ["apps/a.yaml"]


def test_missing_branch(repo: SpecRepo, tmp_path: Path) -> None:
    with GitSource(repo.url, "nope", tmp_path / "cache") as src:
        assert src.remote_revision() is None
        with pytest.raises(SourceError, match="no branch or tag named 'nope'"):
            src.fetch()


def test_spec_files_read_from_tree_with_blob_keys(repo: SpecRepo, source: GitSource) -> None:
    repo.write("apps/team/b.yml", APP_B)
    repo.write("apps/README.md", "not a spec")
    repo.write("other/x.yaml", "outside apps")
    (repo.work / "apps" / "link.yaml").symlink_to("a.yaml")
    rev = repo.commit_and_push("a symlink is not a spec file")
    source.fetch()

    def blob(path: str) -> str:
        return git(repo.work, "rev-parse", f"{rev}:{path}")

    assert source.spec_files(rev) == [
        SpecFile("apps/a.yaml", APP_A.encode(), blob("apps/a.yaml")),
        SpecFile("apps/team/b.yml", APP_B.encode(), blob("apps/team/b.yml")),
    ]
    assert source.spec_files(rev, "apps/team/") == [
        SpecFile("apps/team/b.yml", APP_B.encode(), blob("apps/team/b.yml")),
    ]
    assert source.spec_files(rev, "missing") == []
    assert source.spec_files(rev, "apps/a.yaml") == []  # a file is not an apps folder
    assert [f.path for f in source.spec_files(rev, ".")] == [
        "apps/a.yaml", "apps/team/b.yml", "other/x.yaml",
    ]
    with pytest.raises(SourceError, match="not in the cache"):
        source.spec_files("0" * 40)


def test_changed_paths(repo: SpecRepo, source: GitSource) -> None:
    old = repo.head()
    repo.write("apps/a.yaml", APP_A + "description: changed\n")
    repo.write("apps/b.yaml", APP_B)
    repo.write("docs/readme.md", "outside apps")
    new = repo.commit_and_push("change")
    source.fetch()
    assert source.changed_paths(old, new, "apps") == {"apps/a.yaml", "apps/b.yaml"}
    assert source.changed_paths(old, new, "") == {
        "apps/a.yaml", "apps/b.yaml", "docs/readme.md",
    }
    assert source.changed_paths(new, new, "apps") == set()
    for unknown in ("0" * 40, "--output=/tmp/pwned"):
        with pytest.raises(SourceError, match="not in the cache"):
            source.changed_paths(unknown, new, "apps")
    repo.remove("apps/b.yaml")
    git(repo.work, "mv", "apps/a.yaml", "apps/renamed.yaml")
    newest = repo.commit_and_push("rename and delete")
    source.fetch()
    assert source.changed_paths(new, newest, "apps") == {
        "apps/a.yaml", "apps/b.yaml", "apps/renamed.yaml",
    }


def test_read_file_and_path_escapes(repo: SpecRepo, source: GitSource) -> None:
    repo.write("artifacts/app.tgz", "bytes")
    rev = repo.commit_and_push("artifact")
    source.fetch()
    assert source.read_file(rev, "artifacts/app.tgz") == b"bytes"
    assert source.read_file(rev, "./artifacts//app.tgz") == b"bytes"
    for bad in ("../remote.git/config", "/etc/passwd", "artifacts/../../x", ""):
        with pytest.raises(ArtifactError, match="path"):
            source.read_file(rev, bad)
    with pytest.raises(ArtifactError, match="no such file"):
        source.read_file(rev, "artifacts/missing.tgz")
    with pytest.raises(ArtifactError, match="not a file"):
        source.read_file(rev, "artifacts")


def test_unreachable_remote_is_a_source_error_with_reason(
    repo: SpecRepo, source: GitSource
) -> None:
    source.fetch()
    shutil.rmtree(repo.bare)
    with pytest.raises(SourceError, match="does not appear to be a git repository"):
        source.remote_revision()
    with pytest.raises(SourceError, match=r"fetch .* failed"):
        source.fetch()


def test_credentials_never_in_messages(tmp_path: Path) -> None:
    url = "http://deploy:s3cret@127.0.0.1:1/specs.git"
    assert redact_url(f"fatal: unable to access '{url}/'") == (
        "fatal: unable to access 'http://127.0.0.1:1/specs.git/'"
    )
    with (
        GitSource(url, "main", tmp_path / "cache", fetch_timeout=5) as src,
        pytest.raises(SourceError) as err,
    ):
        src.fetch()
    assert "s3cret" not in str(err.value) and "deploy" not in str(err.value)
    assert "127.0.0.1:1" in str(err.value)


@pytest.fixture
def silent_git_daemon() -> Iterator[int]:
    """A TCP server that accepts git:// connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_fetch_timeout_kills_git(silent_git_daemon: int, tmp_path: Path) -> None:
    url = f"git://127.0.0.1:{silent_git_daemon}/specs.git"
    with GitSource(url, "main", tmp_path / "cache", fetch_timeout=0.5) as src:
        with pytest.raises(SourceError, match=r"timed out after 0.5s"):
            src.remote_revision()
        with pytest.raises(SourceError, match=r"timed out after 0.5s"):
            src.fetch()
    assert not _processes_mentioning(url), "the timed-out git process is still running"


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if text in args:
            found.append(args)
    return found


# -- signatures -------------------------------------------------------------------------------


def _ssh_key(tmp: Path, name: str) -> tuple[Path, str]:
    key = tmp / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True
    )
    public = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    return key, public


def _signed_commit(repo: SpecRepo, message: str, *config: str) -> str:
    git(repo.work, *config, "commit", "-q", "-S", "--allow-empty", "-m", message)
    git(repo.work, "push", "-q", "origin", "HEAD:main")
    return repo.head()


_NO_SSH_KEYGEN = "ssh-keygen (openssh-client) is not installed"
needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason=_NO_SSH_KEYGEN)


@needs_ssh_keygen
def test_ssh_signatures(repo: SpecRepo, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    trusted, trusted_pub = _ssh_key(keys, "trusted")
    stranger, _ = _ssh_key(keys, "stranger")
    allowed = keys / "allowed_signers"
    allowed.write_text(f"release@example.invalid {trusted_pub}\n")

    def sign_with(key: Path) -> tuple[str, ...]:
        return ("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}")

    good = _signed_commit(repo, "signed", *sign_with(trusted))
    with GitSource(repo.url, "main", tmp_path / "cache",
                   verifier=SignatureVerifier(allowed_signers=str(allowed))) as src:  # type: ignore[arg-type]
        assert src.fetch() == good
        assert src.verify(good).startswith("ssh:release@example.invalid SHA256:")

        unsigned = repo.commit_and_push("unsigned")
        src.fetch()
        with pytest.raises(SignatureError, match=f"commit {unsigned[:12]} is not signed"):
            src.verify(unsigned)

        untrusted = _signed_commit(repo, "stranger", *sign_with(stranger))
        src.fetch()
        with pytest.raises(SignatureError, match=r"not trusted .*not in allowed_signers"):
            src.verify(untrusted)

        # Revoking the key (editing allowed_signers) takes effect for commits verified before.
        assert src.verify(good).startswith("ssh:release@example.invalid")
        allowed.write_text("# nobody is trusted any more\n")
        with pytest.raises(SignatureError, match="not in allowed_signers"):
            src.verify(good)

    with GitSource(repo.url, "main", tmp_path / "cache2") as plain:
        assert plain.verify(plain.fetch()) == ""  # no verifier: nothing to check


@pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg (gnupg) is not installed")
def test_gpg_signatures(repo: SpecRepo, tmp_path: Path) -> None:
    home = tmp_path / "gpg"
    home.mkdir(mode=0o700)
    env = {"GNUPGHOME": str(home)}

    def gpg(*args: str) -> bytes:
        return subprocess.run(
            ["gpg", "--batch", "--quiet", "--homedir", str(home), *args],
            check=True, capture_output=True,
        ).stdout

    gpg("--passphrase", "", "--quick-gen-key", "Release <release@example.invalid>",
        "ed25519", "sign", "never")
    fingerprint = next(
        line.split(":")[9] for line in gpg("--with-colons", "--list-keys").decode().splitlines()
        if line.startswith("fpr:")
    )
    keyring = tmp_path / "trusted.gpg"
    keyring.write_bytes(gpg("--export", fingerprint))
    try:
        git(repo.work, "-c", f"user.signingkey={fingerprint}", "commit", "-q", "-S",
            "--allow-empty", "-m", "gpg signed", env=env)
        git(repo.work, "push", "-q", "origin", "HEAD:main")
        good = repo.head()
        verifier = SignatureVerifier(gpg_keyring=keyring)
        with GitSource(repo.url, "main", tmp_path / "cache", verifier=verifier) as src:
            assert src.verify(src.fetch()) == f"gpg:{fingerprint}"

        # The same GPG-signed commit is refused where only SSH signers are trusted.
        ssh_only = tmp_path / "allowed_signers"
        ssh_only.write_text("")
        with GitSource(repo.url, "main", tmp_path / "cache2",
                       verifier=SignatureVerifier(allowed_signers=ssh_only)) as src:
            src.fetch()
            with pytest.raises(SignatureError, match="only SSH signers are trusted"):
                src.verify(good)

        # A GNUPGHOME without the signer's key refuses it.
        with GitSource(repo.url, "main", tmp_path / "cache3",
                       verifier=SignatureVerifier(gpg_home=_empty_home(tmp_path))) as src:
            src.fetch()
            with pytest.raises(SignatureError, match="no trusted public key"):
                src.verify(good)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)


def _empty_home(tmp_path: Path) -> Path:
    home = tmp_path / "empty-gpg"
    home.mkdir(mode=0o700)
    return home


def test_cache_survives_a_killed_git_and_a_broken_init(repo: SpecRepo, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with GitSource(repo.url, "main", cache) as src:
        src.fetch()
        local_ref = src.local_ref
    assert local_ref is not None
    # A fetch killed at its timeout leaves the ref's lock file behind.
    (cache / f"{local_ref}.lock").write_text("")
    newer = repo.commit_and_push("after the kill")
    with GitSource(repo.url, "main", cache) as src:
        assert src.poll() == newer

    (cache / "HEAD").unlink()  # killed during `git init`: the cache is rebuilt, not fatal
    with GitSource(repo.url, "main", cache) as src:
        assert src.local_revision() is None
        assert src.fetch() == newer
        src.reset_cache()
        assert not cache.exists()
        assert src.fetch() == newer


@pytest.mark.parametrize("branch", ["", "-upload-pack=x", "a b", "main:evil", "a..b", "x~1"])
def test_invalid_branch_names(branch: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid branch"):
        GitSource("/nowhere", branch, tmp_path / "cache")
