"""Spawn: fork/exec one app process (own session, its log, instance marker) and await its exit."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from reconciler.core.errors import RuntimeFailure
from reconciler.node.runtimes.base import LaunchSpec, ProcessRecord

# Set in every app process's environment, unique per start: its descendants inherit it, so
# the ones that leave the process group and session are still found and stopped with it.
INSTANCE_ENV = "GITOPS_INSTANCE"


def is_live(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; here PID 1 may never reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass(frozen=True)
class Spawned:
    """One started process: its record, psutil handle (None: already reaped by someone
    else), our Popen, and its INSTANCE_ENV marker."""

    record: ProcessRecord
    proc: psutil.Process | None
    popen: subprocess.Popen[bytes]
    instance: str


def spawn_process(launch: LaunchSpec, clock: Callable[[], float]) -> Spawned:
    """Fork/exec `launch` as a session leader writing to its own log (opened O_APPEND);
    RuntimeFailure, naming the app, when it cannot start."""
    if not launch.argv:
        raise RuntimeFailure(f"{launch.name}: empty command")
    if not launch.workdir.is_dir():
        raise RuntimeFailure(f"{launch.name}: workdir {launch.workdir} is not a directory")
    try:
        launch.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = launch.log_dir / launch.log_file
        # O_APPEND in the open file description the child inherits: copytruncate works
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        log_fd = os.open(log_path, flags, 0o640)
    except OSError as exc:
        raise RuntimeFailure(
            f"{launch.name}: cannot open log in {launch.log_dir}: {exc.strerror}"
        ) from exc
    try:
        header = f"--- gitops-mesh: starting {launch.name} {launch.version}\n"
        os.write(log_fd, header.encode())
        instance = f"{launch.name}.{uuid.uuid4().hex[:16]}"
        popen = subprocess.Popen(
            list(launch.argv),
            # exactly what the agent built (nothing inherited), plus the instance marker
            env={**launch.env, INSTANCE_ENV: instance},
            cwd=launch.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOENT:
            reason = "no such file or directory"
        elif exc.errno == errno.EACCES:
            reason = "permission denied (not executable?)"
        raise RuntimeFailure(
            f"{launch.name}: cannot start {launch.argv[0]!r}: {reason}"
        ) from exc
    finally:
        os.close(log_fd)
    proc: psutil.Process | None
    try:
        proc = psutil.Process(popen.pid)
        create_time = proc.create_time()
        proc.cpu_percent(None)  # prime it: the next call measures since now
    except psutil.Error:  # only if someone else reaped our child; the watch sees the exit
        proc, create_time = None, clock()
    record = ProcessRecord(launch.name, launch.version, popen.pid, popen.pid, create_time)
    return Spawned(record, proc, popen, instance)


async def wait_exit(
    pid: int, popen: subprocess.Popen[bytes] | None, proc: psutil.Process | None, *,
    use_pidfd: bool, poll_interval: float,
) -> None:
    """Return once process `pid` (our child `popen`, or the adopted `proc`) has exited:
    a pidfd becoming readable where `use_pidfd`, else a poll every `poll_interval` s."""
    if use_pidfd:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # already gone (and reaped)
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        def on_readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_readable)
        try:
            # pid reuse guard: the pidfd may name a newer process if ours was reaped
            if popen is None and (proc is None or not is_live(proc)):
                return
            if popen is not None and popen.poll() is not None:
                return
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return
    while True:
        if popen is not None:
            if popen.poll() is not None:
                return
        elif proc is None or not is_live(proc):
            return
        await asyncio.sleep(poll_interval)
