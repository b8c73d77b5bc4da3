"""The Runtime protocol and the values that cross it (process first; systemd/containers later)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol


@dataclass(frozen=True)
class RestartPolicy:
    policy: Literal["always", "on-failure", "never"] = "always"
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_restarts: int = 5  # restarts within `window` seconds -> crash loop -> failed
    window: float = 300.0


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one instance of an app. `env` is the full environment
    (secrets included): a runtime must never log or publish it."""

    name: str
    version: str
    argv: tuple[str, ...]
    env: dict[str, str]
    workdir: Path
    log_dir: Path
    stop_signal: str = "SIGTERM"
    stop_timeout: float = 10.0
    restart: RestartPolicy = field(default_factory=RestartPolicy)


@dataclass(frozen=True)
class ProcessRecord:
    """What is persisted so a restarted agent can adopt the process. `create_time` (psutil,
    seconds since epoch) guards against pid reuse."""

    name: str
    version: str
    pid: int
    pgid: int
    create_time: float


ProcState = Literal["running", "backoff", "crash-loop", "stopped", "exited"]


@dataclass(frozen=True)
class ProcessStats:
    name: str
    version: str
    state: ProcState
    pid: int | None
    restarts: int
    started_at: float | None  # epoch seconds of the current process
    uptime_s: float | None
    cpu_percent: float | None
    rss_bytes: int | None
    last_exit_code: int | None
    message: str = ""


class RuntimeListener(Protocol):
    """Callbacks from a runtime's supervision (called on the event loop thread)."""

    def on_started(self, record: ProcessRecord, restarted: bool) -> None: ...

    def on_exited(self, name: str, returncode: int | None, restart_in: float | None) -> None:
        """`restart_in`: seconds until the supervisor restarts it, None if it will not."""

    def on_crash_loop(self, name: str, message: str) -> None: ...


class Runtime(Protocol):
    async def start(self, launch: LaunchSpec) -> ProcessRecord:
        """Start and supervise; raises RuntimeFailure if the program cannot be spawned."""

    async def stop(self, name: str) -> None:
        """Stop signal to the whole process group, SIGKILL after stop_timeout; no orphans."""

    def adopt(self, launch: LaunchSpec, record: ProcessRecord) -> bool:
        """Take over a process a previous agent started; False if it is gone or the pid was
        reused (create_time differs). Adopted processes are supervised like own children."""

    def stats(self, name: str) -> ProcessStats | None: ...

    def names(self) -> set[str]: ...

    async def close(self, stop_apps: bool) -> None:
        """Stop supervising; stop every app only when `stop_apps`."""
