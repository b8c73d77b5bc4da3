"""Running the git CLI: one command in its own process group, bounded by a timeout. I/O shell."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.core.errors import SourceError
from reconciler.node.runtimes.process import kill_group


def git_env() -> dict[str, str]:
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
        env=env or git_env(),
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
            kill_group(proc.pid)
            proc.communicate()
            raise SourceError(f"{what} timed out after {timeout:g}s") from None
        except BaseException:
            kill_group(proc.pid)
            raise
    return GitResult(proc.returncode, out, err)


def first_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in lines:
        if line.startswith(("fatal:", "error:")):
            return line.split(":", 1)[1].strip()
    return lines[-1] if lines else "no error output"
