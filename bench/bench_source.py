"""Benchmark the git source floor on a local repo: ls-remote, fetch, spec_files, changed_paths.

Run: PATH=/tmp/gmvenv/bin:$PATH python bench/bench_source.py [--files 500] [--rounds 30]
Prints median and p90 in milliseconds; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reconciler.node.source import GitSource, SignatureVerifier

ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True, text=True
    ).stdout.strip()


def commit_and_push(work: Path, message: str) -> str:
    git(work, "add", "-A")
    git(work, "commit", "-q", "--allow-empty", "-m", message)
    git(work, "push", "-q", "origin", "HEAD:main")
    return git(work, "rev-parse", "HEAD")


def measure(label: str, rounds: int, step: Callable[[], object],
            before: Callable[[], object] | None = None) -> None:
    samples = []
    for _ in range(rounds):
        if before is not None:
            before()
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    p90 = samples[min(len(samples) - 1, int(len(samples) * 0.9))]
    print(f"{label:<42} median {statistics.median(samples):8.2f} ms   p90 {p90:8.2f} ms"
          f"   (n={rounds})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=500, help="spec files in apps/")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-source-") as tmp_name:
        tmp = Path(tmp_name)
        bare, work = tmp / "remote.git", tmp / "work"
        bare.mkdir()
        git(bare, "init", "-q", "--bare", "-b", "main")
        work.mkdir()
        git(work, "init", "-q", "-b", "main")
        git(work, "remote", "add", "origin", str(bare))
        apps = work / "apps"
        for i in range(args.files):
            group = apps / f"team-{i % 20:02d}"
            group.mkdir(parents=True, exist_ok=True)
            (group / f"app-{i:04d}.yaml").write_text(
                f"name: app-{i:04d}\nversion: '1.{i}'\nrun:\n  command: [sleep, '3600']\n"
            )
        commit_and_push(work, "initial")

        counter = iter(range(10**9))

        def push_one() -> None:
            n = next(counter)
            (apps / "team-00" / "app-0000.yaml").write_text(
                f"name: app-0000\nversion: '2.{n}'\n"
            )
            commit_and_push(work, f"change {n}")

        print(f"git source floor: local bare repo, {args.files} spec files, "
              f"{os.cpu_count()} cpus")
        with GitSource(str(bare), "main", tmp / "cache") as source:
            first = source.fetch()
            measure("remote_revision (ls-remote)", args.rounds, source.remote_revision)
            measure("poll, unchanged (ls-remote + rev-parse)", args.rounds, source.poll)
            measure("fetch, no change", args.rounds, source.fetch)
            measure("fetch, one new commit", args.rounds, source.fetch, before=push_one)
            head = source.fetch()
            measure(f"spec_files ({args.files} files)", args.rounds,
                    lambda: source.spec_files(head))
            measure("changed_paths (first..head)", args.rounds,
                    lambda: source.changed_paths(first, head, "apps"))
        if shutil.which("ssh-keygen"):
            bench_verify(tmp, work, bare, args.rounds)


def bench_verify(tmp: Path, work: Path, bare: Path, rounds: int) -> None:
    key = tmp / "signing-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    allowed = tmp / "allowed_signers"
    public = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    allowed.write_text(f"bench@example.invalid {public}\n")
    git(work, "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}",
        "commit", "-q", "-S", "--allow-empty", "-m", "signed")
    git(work, "push", "-q", "origin", "HEAD:main")
    verifier = SignatureVerifier(allowed_signers=allowed)
    with GitSource(str(bare), "main", tmp / "cache-verify", verifier=verifier) as source:
        head = source.fetch()

        def fresh() -> None:
            source._signatures._verified.clear()  # bench the first check, not the cache

        measure("verify (ssh signature, first time)", rounds, lambda: source.verify(head),
                before=fresh)
        measure("verify (same revision again, cached)", rounds, lambda: source.verify(head))


if __name__ == "__main__":
    main()
