"""Process runtime: spawn apps as session leaders, supervise, restart with backoff, adopt, stop.

Each app runs in its own session and process group (so it outlives an agent crash and can be
adopted by the next agent), with stdout+stderr written by the app itself to
`<log_dir>/<name>.log` (opened O_APPEND, no pipe through the agent). Exits are watched with a
pidfd where the kernel has one (instant, no threads, works for adopted processes too) and with
a psutil poll otherwise (the fork/exec and the exit wait are runtimes/spawn.py). Decisions
about restarts live in the pure `next_after_exit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from reconciler.core.errors import RuntimeFailure
from reconciler.node.runtimes.base import (
    ALIVE_STATES,
    LaunchSpec,
    ProcessRecord,
    ProcessStats,
    ProcState,
    RestartPolicy,
    RuntimeListener,
)
from reconciler.node.runtimes.spawn import INSTANCE_ENV, is_live, spawn_process, wait_exit

log = logging.getLogger(__name__)

# psutil create_time is derived from jiffies: allow rounding
CREATE_TIME_TOLERANCE = 0.05
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_KEEP = 3


# --- pure decisions -----------------------------------------------------------------------


@dataclass(frozen=True)
class ExitDecision:
    """What to do after an app's process exited: restart after `restart_in` seconds (None: do
    not restart), the state to report, the next backoff and whether this is a crash loop."""

    state: ProcState
    restart_in: float | None
    next_backoff: float
    crash_loop: bool = False
    message: str = ""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exited (exit code unknown: not our child)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


def next_after_exit(
    policy: RestartPolicy,
    returncode: int | None,
    *,
    uptime: float,
    backoff: float,
    recent_restarts: int,
    stable_after: float,
    what: str | None = None,
) -> ExitDecision:
    """Apply a restart policy to one exit. Pure.

    `returncode` follows subprocess: negative means killed by that signal, None means unknown
    (an adopted process: we cannot wait() for a process that is not our child), which counts
    as a failure. `backoff` is the delay the next restart would use; it is reset to
    `policy.backoff_initial` when the process stayed up for `stable_after` seconds.
    `recent_restarts` counts restarts within `policy.window`. `what` overrides the
    description of the exit (e.g. a restart that could not spawn).
    """
    what = what or describe_exit(returncode)
    failed = returncode != 0
    if policy.policy == "never" or (policy.policy == "on-failure" and not failed):
        message = f"{what}; restart policy {policy.policy}"
        return ExitDecision("exited", None, backoff, message=message)
    if uptime >= stable_after:
        backoff = policy.backoff_initial
    if recent_restarts >= policy.max_restarts:
        return ExitDecision(
            "crash-loop",
            None,
            backoff,
            crash_loop=True,
            message=(
                f"{what}; restarted {recent_restarts} times within "
                f"{policy.window:g}s, not restarting (crash loop)"
            ),
        )
    delay = min(backoff, policy.backoff_max)
    return ExitDecision(
        "backoff",
        delay,
        min(max(delay * 2, policy.backoff_initial), policy.backoff_max),
        message=f"{what}; restarting in {delay:g}s",
    )


# --- log rotation ---------------------------------------------------------------------------


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> bool:
    """copytruncate rotation: `x.log` -> `x.log.1` -> ... -> `x.log.<keep>`; returns True if
    it rotated. The app keeps its file descriptor (opened O_APPEND, so after the truncate it
    writes at the new end of the file): this works for adopted processes we never spawned.
    Lines written between the copy and the truncate are lost, as with logrotate's copytruncate.
    """
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    for index in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    if keep >= 1:
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with open(path, "r+b") as handle:
        handle.truncate(0)
    return True


# --- process-group helpers --------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group `pgid` or in session `pgid` (an app may have
    moved a child to a new group; leaving the session needs setsid, i.e. real daemonizing)."""
    members: list[int] = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid and os.getsid(pid) != pgid:
                continue
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                continue
        except (OSError, psutil.Error):
            continue
        members.append(pid)
    return members


def marked_processes(instance: str | None) -> list[psutil.Process]:
    """Live processes whose environment carries INSTANCE_ENV=instance: every descendant of
    one app instance, also those that left its process group and session (setsid, a
    daemonizing child), since the environment is inherited."""
    if not instance:
        return []
    found: list[psutil.Process] = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(INSTANCE_ENV) == instance and is_live(proc):
                found.append(proc)
        except (psutil.Error, OSError):  # gone, or not ours to read
            continue
    return found


def _signal_group(pgid: int, sig: signal.Signals, escaped: Sequence[psutil.Process] = ()) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for pid in group_members(pgid):
        # Only session members that moved to another group: killpg above already reached
        # the rest, and a second signal would run an app's handler twice.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) != pgid:
                os.kill(pid, sig)
    for proc in escaped:
        with contextlib.suppress(psutil.Error, OSError):  # it may be gone by now
            if os.getpgid(proc.pid) != pgid:
                proc.send_signal(sig)


async def _wait_stopped(
    popen: subprocess.Popen[bytes] | None, pgid: int, timeout: float,
    escaped: Sequence[psutil.Process] = (),
) -> bool:
    """Wait until our child (reaped, so it is no zombie), every group member and the
    `escaped` processes are gone."""
    deadline = time.monotonic() + timeout
    delay = 0.002  # most apps exit within milliseconds of SIGTERM
    if popen is not None:
        while popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
    if not await _wait_group_gone(pgid, max(0.0, deadline - time.monotonic())):
        return False
    while any(is_live(proc) for proc in escaped):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if not await asyncio.to_thread(group_members, pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def stop_group(
    pgid: int, sig: signal.Signals, timeout: float, *,
    popen: subprocess.Popen[bytes] | None = None, name: str = "", instance: str | None = None,
) -> bool:
    """`sig` to the group (and to the processes marked with `instance` that left it), SIGKILL
    after `timeout`, until none is left. The one way this project stops an app's processes;
    False when some survived SIGKILL too."""
    escaped = await asyncio.to_thread(marked_processes, instance)
    _signal_group(pgid, sig, escaped)
    if await _wait_stopped(popen, pgid, timeout, escaped):
        return True
    log.warning("%s did not stop within %gs: SIGKILL", name or f"group {pgid}", timeout)
    _signal_group(pgid, signal.SIGKILL, escaped)
    return await _wait_stopped(popen, pgid, 10.0, escaped)


def instance_of(proc: psutil.Process) -> str | None:
    """The INSTANCE_ENV marker of a running app process (None: unreadable or unmarked)."""
    try:
        return proc.environ().get(INSTANCE_ENV)
    except (psutil.Error, OSError):
        return None


def _leftovers(pgid: int, instance: str | None) -> bool:
    return bool(group_members(pgid)) or bool(marked_processes(instance))


def kill_group(pgid: int) -> None:
    """SIGKILL to a process group that must go now (a timed-out git or probe, an orphan)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def pid_alive(pid: int | None, create_time: float | None) -> bool:
    """True when `pid` runs and is the process we recorded (create_time guards pid reuse)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return (create_time is None
                or abs(proc.create_time() - create_time) <= CREATE_TIME_TOLERANCE)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


async def stop_recorded(proc: ProcessRecord | None, timeout: float = 5.0) -> None:
    """Stop a recorded process that must not keep running (the other half of an interrupted
    upgrade), with its group; only while pid and create_time still name that process."""
    if proc is None or not pid_alive(proc.pid, proc.create_time):
        return
    log.warning("%s: stopping leftover %s process %d", proc.name, proc.version, proc.pid)
    await stop_group(proc.pgid, signal.SIGTERM, timeout, name=proc.name)


# --- the runtime ------------------------------------------------------------------------------

# Children left running by close(stop_apps=False). Kept referenced (and reaped once they exit)
# so a still-running app is not reported as a leaked resource when its Popen is collected.
_detached: list[subprocess.Popen[bytes]] = []


def _reap_detached() -> None:
    _detached[:] = [popen for popen in _detached if popen.poll() is None]


@dataclass
class _App:
    launch: LaunchSpec
    record: ProcessRecord | None = None
    proc: psutil.Process | None = None
    popen: subprocess.Popen[bytes] | None = None  # None for adopted processes
    state: ProcState = "running"
    started_at: float | None = None
    restarts: int = 0
    restart_times: deque[float] = field(default_factory=deque)
    backoff: float = 0.0
    last_exit_code: int | None = None
    message: str = ""
    stopping: bool = False
    instance: str | None = None  # INSTANCE_ENV of the current process (None: unknown)
    watch_task: asyncio.Task[None] | None = None
    restart_task: asyncio.Task[None] | None = None


class ProcessRuntime:
    """Runtime for plain processes (see runtimes.base.Runtime for the contract).

    `clock` (epoch seconds) drives uptime, backoff reset and the crash-loop window;
    `stable_after` is how long a process must stay up for its backoff to reset (default:
    min(2 x backoff_max, 60 s)); `poll_interval` is the psutil poll used when no pidfd is
    available; logs are rotated every `rotate_interval` seconds past `log_max_bytes`.
    """

    def __init__(
        self,
        listener: RuntimeListener,
        clock: Callable[[], float] = time.time,
        *,
        log_max_bytes: int = LOG_MAX_BYTES,
        log_keep: int = LOG_KEEP,
        rotate_interval: float = 10.0,
        poll_interval: float = 0.25,
        stable_after: float | None = None,
        use_pidfd: bool = True,
    ) -> None:
        self._listener = listener
        self._clock = clock
        self._log_max_bytes = log_max_bytes
        self._log_keep = log_keep
        self._rotate_interval = rotate_interval
        self._poll_interval = poll_interval
        self._stable_after = stable_after
        self._use_pidfd = use_pidfd and hasattr(os, "pidfd_open")
        self._apps: dict[str, _App] = {}
        self._rotate_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- Runtime protocol --

    async def start(self, launch: LaunchSpec) -> ProcessRecord:
        self._check_open()
        current = self._apps.get(launch.name)
        if current is not None and current.state in ALIVE_STATES:
            pid = current.record.pid if current.record else None
            raise RuntimeFailure(
                f"{launch.name}: already running (pid {pid}, state {current.state}); stop it first"
            )
        app = _App(launch=launch, backoff=launch.restart.backoff_initial)
        self._apps[launch.name] = app
        try:
            record = self._spawn(app)
        except RuntimeFailure:
            del self._apps[launch.name]
            raise
        self._ensure_rotation()
        self._notify_started(record, restarted=False)
        return record

    async def stop(self, name: str) -> None:
        app = self._apps.get(name)
        if app is None:
            return
        app.stopping = True
        if app.restart_task is not None:
            app.restart_task.cancel()
        try:
            await self._terminate(app)
        finally:
            if self._apps.get(name) is app:
                del self._apps[name]
            app.state = "stopped"
            if app.watch_task is not None:
                app.watch_task.cancel()
                await asyncio.gather(app.watch_task, return_exceptions=True)

    def adopt(self, launch: LaunchSpec, record: ProcessRecord) -> bool:
        self._check_open()
        current = self._apps.get(launch.name)
        if current is not None and current.record is not None:
            return current.record.pid == record.pid and current.state == "running"
        try:
            proc = psutil.Process(record.pid)
            same = abs(proc.create_time() - record.create_time) <= CREATE_TIME_TOLERANCE
            if not same or not is_live(proc) or os.getpgid(record.pid) != record.pgid:
                return False
        except (psutil.Error, OSError):
            return False
        app = _App(
            launch=launch,
            record=record,
            proc=proc,
            started_at=record.create_time,
            backoff=launch.restart.backoff_initial,
            message=f"adopted pid {record.pid}",
            instance=instance_of(proc),
        )
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)  # prime it: the next call measures since now
        self._apps[launch.name] = app
        app.watch_task = asyncio.get_running_loop().create_task(
            self._watch(app, proc), name=f"watch-{launch.name}"
        )
        self._ensure_rotation()
        log.info("adopted %s pid %s", launch.name, record.pid)
        return True

    def rename(self, old: str, new: str) -> None:
        if new in self._apps:
            raise RuntimeFailure(f"{new}: still supervised; stop it before renaming {old}")
        app = self._apps.pop(old, None)
        if app is None:
            return
        # the watcher and later restarts go by launch.name; the marker stays the instance's
        app.launch = replace(app.launch, name=new)
        self._apps[new] = app
        log.info("%s now supervised as %s", old, new)

    def stats(self, name: str) -> ProcessStats | None:
        app = self._apps.get(name)
        if app is None:
            return None
        cpu: float | None = None
        rss: int | None = None
        pid: int | None = None
        if app.state == "running" and app.proc is not None:
            pid = app.proc.pid
            try:
                with app.proc.oneshot():
                    cpu = app.proc.cpu_percent(None)
                    rss = app.proc.memory_info().rss
            except psutil.Error:
                pass
        started = app.started_at if app.state == "running" else None
        return ProcessStats(
            name=name,
            version=app.launch.version,
            state=app.state,
            pid=pid,
            restarts=app.restarts,
            started_at=started,
            uptime_s=None if started is None else max(0.0, self._clock() - started),
            cpu_percent=cpu,
            rss_bytes=rss,
            last_exit_code=app.last_exit_code,
            message=app.message,
        )

    def state(self, name: str) -> ProcState | None:
        app = self._apps.get(name)
        return None if app is None else app.state

    def names(self) -> set[str]:
        return set(self._apps)

    async def close(self, stop_apps: bool) -> None:
        if self._closed:
            return
        self._closed = True
        tasks: list[asyncio.Task[None]] = []
        if self._rotate_task is not None:
            self._rotate_task.cancel()
            tasks.append(self._rotate_task)
        if stop_apps:
            await asyncio.gather(*(self.stop(name) for name in list(self._apps)))
        else:
            # Leave every app running for the next agent to adopt: only drop our watchers.
            _reap_detached()
            for app in self._apps.values():
                app.stopping = True
                if app.popen is not None:
                    _detached.append(app.popen)
                for task in (app.watch_task, app.restart_task):
                    if task is not None:
                        task.cancel()
                        tasks.append(task)
            self._apps.clear()
        # let cancelled watchers release their pidfds before the loop may close
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- extras --

    def rotate_logs(self) -> list[str]:
        """Rotate every supervised app's log that is past the size limit; returns their names."""
        rotated = []
        for name, app in list(self._apps.items()):
            path = app.launch.log_dir / app.launch.log_file
            try:
                if rotate_log(path, self._log_max_bytes, self._log_keep):
                    rotated.append(name)
            except OSError as exc:
                log.warning("rotating %s failed: %s", path, exc)
        return rotated

    # -- internals --

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeFailure("the process runtime is closed")

    def _spawn(self, app: _App) -> ProcessRecord:
        """Fork/exec one process for `app` and start watching it; RuntimeFailure if it cannot."""
        launch = app.launch
        _reap_detached()
        spawned = spawn_process(launch, self._clock)
        record, proc = spawned.record, spawned.proc
        app.record, app.proc, app.popen = record, proc, spawned.popen
        app.instance = spawned.instance
        app.state, app.started_at = "running", self._clock()
        app.message = f"running pid {record.pid}"
        app.watch_task = asyncio.get_running_loop().create_task(
            self._watch(app, proc), name=f"watch-{launch.name}"
        )
        log.info("started %s %s pid %s", launch.name, launch.version, record.pid)
        return record

    async def _watch(self, app: _App, proc: psutil.Process | None) -> None:
        """Wait for this process to exit, then apply the restart policy."""
        record = app.record
        assert record is not None

        def superseded() -> bool:
            return (
                app.stopping
                or self._apps.get(app.launch.name) is not app
                or app.record is not record
            )

        try:
            popen = app.popen
            await wait_exit(record.pid, popen, proc, use_pidfd=self._use_pidfd,
                            poll_interval=self._poll_interval)
            returncode = popen.poll() if popen is not None else None
            if superseded():
                return
            # The app is its process group: what the leader left behind goes with it, so a
            # restart never runs next to leftovers of the old instance.
            if await asyncio.to_thread(_leftovers, record.pgid, app.instance):
                log.info("%s exited; stopping what is left of it", record.name)
                await self._stop_group(app.launch, record.pgid, None, app.instance)
            if superseded():
                return
            self._on_exit(app, returncode)
        except Exception:  # a bug here must not go unnoticed as a never-retrieved task error
            log.exception("supervising %s failed", app.launch.name)

    def _on_exit(self, app: _App, returncode: int | None, what: str | None = None) -> None:
        launch = app.launch
        now = self._clock()
        uptime = now - app.started_at if app.started_at is not None else 0.0
        window_start = now - launch.restart.window
        while app.restart_times and app.restart_times[0] < window_start:
            app.restart_times.popleft()
        stable_after = self._stable_after
        if stable_after is None:
            stable_after = min(2 * launch.restart.backoff_max, 60.0)
        decision = next_after_exit(
            launch.restart,
            returncode,
            uptime=uptime,
            backoff=app.backoff,
            recent_restarts=len(app.restart_times),
            stable_after=stable_after,
            what=what,
        )
        app.last_exit_code = returncode
        app.state, app.backoff = decision.state, decision.next_backoff
        app.message = decision.message
        app.proc, app.popen = None, None
        pid = app.record.pid if app.record else "?"
        log.info("%s pid %s %s", launch.name, pid, decision.message)
        self._call(self._listener.on_exited, launch.name, returncode, decision.restart_in)
        if decision.crash_loop:
            self._call(self._listener.on_crash_loop, launch.name, decision.message)
        if decision.restart_in is not None:
            app.restart_task = asyncio.get_running_loop().create_task(
                self._restart_later(app, decision.restart_in), name=f"restart-{launch.name}"
            )

    async def _restart_later(self, app: _App, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            self._restart_now(app)
        except Exception:
            log.exception("restarting %s failed", app.launch.name)

    def _restart_now(self, app: _App) -> None:
        if app.stopping or self._apps.get(app.launch.name) is not app:
            return
        app.restart_times.append(self._clock())
        app.restarts += 1
        try:
            record = self._spawn(app)
        except RuntimeFailure as exc:  # e.g. the program was removed meanwhile
            # counts as a failed attempt: backoff grows, a crash loop ends it
            app.started_at = self._clock()
            self._on_exit(app, None, what=str(exc))
            return
        self._notify_started(record, restarted=True)

    async def _terminate(self, app: _App) -> None:
        record = app.record
        if record is None or app.state != "running":
            return
        launch = app.launch
        pgid = record.pgid
        if app.popen is None and app.proc is not None and not is_live(app.proc):
            return  # adopted and already gone: its pgid may belong to someone else by now
        popen = app.popen
        await self._stop_group(launch, pgid, popen, app.instance)
        if popen is not None:
            app.last_exit_code = popen.poll()
        app.message = "stopped"

    async def _stop_group(
        self, launch: LaunchSpec, pgid: int, popen: subprocess.Popen[bytes] | None,
        instance: str | None,
    ) -> None:
        if not await stop_group(pgid, signal.Signals[launch.stop_signal], launch.stop_timeout,
                                popen=popen, name=launch.name, instance=instance):
            raise RuntimeFailure(
                f"{launch.name}: processes of group {pgid} survived SIGKILL: "
                f"{await asyncio.to_thread(group_members, pgid)}"
            )

    def _ensure_rotation(self) -> None:
        if self._rotate_task is None or self._rotate_task.done():
            self._rotate_task = asyncio.get_running_loop().create_task(
                self._rotate_forever(), name="log-rotation"
            )

    async def _rotate_forever(self) -> None:
        while True:
            await asyncio.sleep(self._rotate_interval)
            await asyncio.to_thread(self.rotate_logs)

    def _notify_started(self, record: ProcessRecord, restarted: bool) -> None:
        self._call(self._listener.on_started, record, restarted)

    @staticmethod
    def _call(callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:  # a listener bug must not stop supervision
            log.exception("runtime listener %s failed", getattr(callback, "__name__", callback))
