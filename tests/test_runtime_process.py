"""ProcessRuntime with real child processes: start/stop, restarts, crash loops, adoption, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from reconciler.core.errors import RuntimeFailure
from reconciler.node.runtimes.base import LaunchSpec, ProcessRecord, ProcessStats, RestartPolicy
from reconciler.node.runtimes.process import (
    ExitDecision,
    ProcessRuntime,
    group_members,
    next_after_exit,
    rotate_log,
)
from tests.conftest import eventually_async

SECRET = "s3cr3t-token-value-4711"
PY = sys.executable


class Recorder:
    """A RuntimeListener that records every callback."""

    def __init__(self) -> None:
        self.started: list[tuple[ProcessRecord, bool]] = []
        self.exited: list[tuple[str, int | None, float | None]] = []
        self.crash_loops: list[tuple[str, str]] = []

    def on_started(self, record: ProcessRecord, restarted: bool) -> None:
        self.started.append((record, restarted))

    def on_exited(self, name: str, returncode: int | None, restart_in: float | None) -> None:
        self.exited.append((name, returncode, restart_in))

    def on_crash_loop(self, name: str, message: str) -> None:
        self.crash_loops.append((name, message))


def launch(
    tmp: Path,
    name: str,
    argv: list[str],
    restart: RestartPolicy | None = None,
    stop_timeout: float = 5.0,
) -> LaunchSpec:
    return LaunchSpec(
        name=name,
        version="1.0",
        argv=tuple(argv),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SECRET_TOKEN": SECRET},
        workdir=tmp,
        log_dir=tmp / "logs",
        stop_timeout=stop_timeout,
        restart=restart or RestartPolicy(),
    )


def py(script: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(script)]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def until(check: Callable[[], object], what: str) -> None:
    """eventually_async() for a plain (non-async) check."""

    async def probe() -> object:
        return check()

    await eventually_async(probe, timeout=10.0, what=what)


def log_text(tmp: Path, name: str) -> str:
    path = tmp / "logs" / f"{name}.log"
    return path.read_text() if path.exists() else ""


# --- pure restart decisions --------------------------------------------------------------

POLICY = RestartPolicy("always", backoff_initial=1.0, backoff_max=8.0, max_restarts=3, window=60)


@pytest.mark.parametrize(
    ("policy", "returncode", "uptime", "backoff", "recent", "expected"),
    [
        (POLICY, 1, 0.5, 1.0, 0,
         ExitDecision("backoff", 1.0, 2.0, message="exited with code 1; restarting in 1s")),
        (POLICY, 0, 0.5, 4.0, 2,
         ExitDecision("backoff", 4.0, 8.0, message="exited with code 0; restarting in 4s")),
        (POLICY, -9, 0.5, 8.0, 1,
         ExitDecision("backoff", 8.0, 8.0, message="killed by SIGKILL; restarting in 8s")),
        # stayed up long enough: backoff starts over
        (POLICY, 1, 20.0, 8.0, 1,
         ExitDecision("backoff", 1.0, 2.0, message="exited with code 1; restarting in 1s")),
        (POLICY, 1, 0.5, 2.0, 3,
         ExitDecision("crash-loop", None, 2.0, crash_loop=True,
                      message="exited with code 1; restarted 3 times within 60s, "
                              "not restarting (crash loop)")),
        (RestartPolicy("on-failure"), 0, 0.5, 1.0, 0,
         ExitDecision("exited", None, 1.0,
                      message="exited with code 0; restart policy on-failure")),
        (RestartPolicy("on-failure"), -15, 0.5, 1.0, 0,
         ExitDecision("backoff", 1.0, 2.0, message="killed by SIGTERM; restarting in 1s")),
        (RestartPolicy("on-failure"), None, 0.5, 1.0, 0,
         ExitDecision("backoff", 1.0, 2.0,
                      message="exited (exit code unknown: not our child); restarting in 1s")),
        (RestartPolicy("never"), 2, 0.5, 1.0, 0,
         ExitDecision("exited", None, 1.0, message="exited with code 2; restart policy never")),
    ],
)
def test_next_after_exit(
    policy: RestartPolicy, returncode: int | None, uptime: float, backoff: float, recent: int,
    expected: ExitDecision,
) -> None:
    decision = next_after_exit(
        policy, returncode, uptime=uptime, backoff=backoff, recent_restarts=recent,
        stable_after=16.0,
    )
    assert decision == expected


# --- start / stop -----------------------------------------------------------------------------


async def test_start_logs_env_and_stop_with_sigterm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    now = [1000.0]
    rec = Recorder()
    runtime = ProcessRuntime(rec, clock=lambda: now[0])
    app = launch(tmp_path, "web", py("""
        import os, signal, sys, time
        def term(*_):
            print("got SIGTERM", flush=True)
            time.sleep(0.2)  # a second SIGTERM would re-enter this handler meanwhile
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        print("secret length", len(os.environ["SECRET_TOKEN"]), flush=True)
        print("inherited HOME:", "HOME" in os.environ, "cwd:", os.getcwd(), flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    """))
    record = await runtime.start(app)
    assert rec.started == [(record, False)]
    assert record.pgid == record.pid
    assert os.getsid(record.pid) == record.pid  # a session of its own: survives the agent
    await until(lambda: "to stderr" in log_text(tmp_path, "web"), what="app output")
    text = log_text(tmp_path, "web")
    assert f"secret length {len(SECRET)}" in text
    assert f"inherited HOME: False cwd: {tmp_path}" in text

    now[0] = 1005.0
    stats = runtime.stats("web")
    assert stats is not None and stats.rss_bytes and stats.cpu_percent is not None
    assert stats == ProcessStats(
        name="web", version="1.0", state="running", pid=record.pid, restarts=0,
        started_at=1000.0, uptime_s=5.0, cpu_percent=stats.cpu_percent,
        rss_bytes=stats.rss_bytes, last_exit_code=None, message=f"running pid {record.pid}",
    )
    assert runtime.names() == {"web"}

    await runtime.stop("web")
    assert not alive(record.pid)
    assert log_text(tmp_path, "web").count("got SIGTERM") == 1  # signalled once, not twice
    assert runtime.names() == set() and runtime.stats("web") is None
    assert rec.exited == []  # a deliberate stop is not an exit to react to
    await runtime.stop("web")  # stopping what is not running is a no-op
    await runtime.close(stop_apps=True)

    seen = [log_text(tmp_path, "web"), caplog.text, stats.message]
    assert not [text for text in seen if SECRET in text]


async def test_sigterm_ignoring_app_and_its_children_are_killed(tmp_path: Path) -> None:
    runtime = ProcessRuntime(Recorder())
    app = launch(tmp_path, "stubborn", py(f"""
        import signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = ["{PY}", "-c", "import signal, time; "
                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"]
        a = subprocess.Popen(child)
        b = subprocess.Popen(child, process_group=0)  # moved to its own group, same session
        print("children", a.pid, b.pid, flush=True)
        signal.pause()  # until killed
    """), stop_timeout=0.3)
    record = await runtime.start(app)

    async def children() -> list[int]:
        for line in log_text(tmp_path, "stubborn").splitlines():
            if line.startswith("children "):
                return [int(pid) for pid in line.split()[1:]]
        return []

    kids = await eventually_async(children, what="grandchildren started")
    assert all(alive(pid) for pid in kids)
    await runtime.stop("stubborn")
    assert [pid for pid in [record.pid, *kids] if alive(pid)] == []
    assert group_members(record.pgid) == []


async def test_start_failures_are_clear_and_leave_nothing(tmp_path: Path) -> None:
    runtime = ProcessRuntime(Recorder())
    with pytest.raises(RuntimeFailure) as missing:
        await runtime.start(launch(tmp_path, "ghost", ["no-such-program-xyz", "--flag"]))
    assert str(missing.value) == (
        "ghost: cannot start 'no-such-program-xyz': no such file or directory"
    )
    bad_dir = LaunchSpec(**{**vars(launch(tmp_path, "lost", ["/bin/true"])),
                            "workdir": tmp_path / "nope"})
    with pytest.raises(RuntimeFailure) as nodir:
        await runtime.start(bad_dir)
    assert str(nodir.value) == f"lost: workdir {tmp_path / 'nope'} is not a directory"
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")  # not executable
    with pytest.raises(RuntimeFailure) as noexec:
        await runtime.start(launch(tmp_path, "noexec", [str(script)]))
    assert "permission denied" in str(noexec.value)
    assert runtime.names() == set()

    await runtime.start(launch(tmp_path, "once", ["/bin/sleep", "30"]))
    with pytest.raises(RuntimeFailure, match="once: already running"):
        await runtime.start(launch(tmp_path, "once", ["/bin/sleep", "30"]))
    await runtime.close(stop_apps=True)
    assert runtime.names() == set()


# --- supervision ----------------------------------------------------------------------------


async def test_crash_restarts_with_growing_backoff_until_crash_loop(tmp_path: Path) -> None:
    rec = Recorder()
    runtime = ProcessRuntime(rec, stable_after=30.0)
    policy = RestartPolicy("always", backoff_initial=0.05, backoff_max=0.2, max_restarts=3,
                           window=60.0)
    await runtime.start(launch(tmp_path, "crashy", ["/bin/sh", "-c", "exit 3"], restart=policy))
    await until(lambda: rec.crash_loops, what="crash loop")

    assert rec.exited == [
        ("crashy", 3, 0.05), ("crashy", 3, 0.1), ("crashy", 3, 0.2), ("crashy", 3, None),
    ]
    assert [restarted for _, restarted in rec.started] == [False, True, True, True]
    assert len({record.pid for record, _ in rec.started}) == 4
    # every instance appends to the same log
    assert log_text(tmp_path, "crashy").count("--- gitops-mesh: starting crashy 1.0\n") == 4
    assert rec.crash_loops == [
        ("crashy", "exited with code 3; restarted 3 times within 60s, not restarting (crash loop)")
    ]
    await asyncio.sleep(0.4)  # longer than the largest backoff: nothing else may start
    assert len(rec.started) == 4
    stats = runtime.stats("crashy")
    assert stats is not None
    assert (stats.state, stats.pid, stats.restarts, stats.last_exit_code) == (
        "crash-loop", None, 3, 3
    )
    await runtime.close(stop_apps=True)


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "psutil-poll"])
async def test_restart_policies(tmp_path: Path, use_pidfd: bool) -> None:
    rec = Recorder()
    runtime = ProcessRuntime(rec, poll_interval=0.05, use_pidfd=use_pidfd)
    await runtime.start(launch(tmp_path, "clean", ["/bin/sh", "-c", "exit 0"],
                               restart=RestartPolicy("on-failure", 0.01, 0.01)))
    await runtime.start(launch(tmp_path, "never", ["/bin/sh", "-c", "exit 2"],
                               restart=RestartPolicy("never", 0.01, 0.01)))
    await runtime.start(launch(tmp_path, "killed", ["/bin/sh", "-c", "kill -9 $$"],
                               restart=RestartPolicy("on-failure", 0.01, 0.01, max_restarts=1)))
    await until(lambda: len(rec.exited) == 4, what="every exit seen")
    exits: dict[str, list[tuple[int | None, float | None]]] = {}
    for name, returncode, restart_in in rec.exited:
        exits.setdefault(name, []).append((returncode, restart_in))
    assert exits == {
        "clean": [(0, None)], "never": [(2, None)], "killed": [(-9, 0.01), (-9, None)]
    }
    assert sorted((r.name, again) for r, again in rec.started) == [
        ("clean", False), ("killed", False), ("killed", True), ("never", False),
    ]
    states = {name: getattr(runtime.stats(name), "state", None) for name in runtime.names()}
    assert states == {"clean": "exited", "never": "exited", "killed": "crash-loop"}
    await runtime.close(stop_apps=True)


async def test_what_an_exited_app_leaves_behind_is_stopped(tmp_path: Path) -> None:
    rec = Recorder()
    runtime = ProcessRuntime(rec)
    app = launch(tmp_path, "leaky", ["/bin/sh", "-c", "sleep 60 & echo left $!; exit 1"],
                 restart=RestartPolicy("never"))
    record = await runtime.start(app)
    await until(lambda: rec.exited, what="exit seen")
    left = int(log_text(tmp_path, "leaky").split("left ")[1].split()[0])
    assert rec.exited == [("leaky", 1, None)]
    assert not alive(left) and group_members(record.pgid) == []
    await runtime.close(stop_apps=True)


async def test_a_restart_that_cannot_spawn_counts_toward_the_crash_loop(tmp_path: Path) -> None:
    rec = Recorder()
    runtime = ProcessRuntime(rec, stable_after=30.0)
    script = tmp_path / "once.sh"
    script.write_text('#!/bin/sh\nrm -f "$0"\nexit 1\n')  # removes itself: restarts fail
    script.chmod(0o755)
    policy = RestartPolicy("always", backoff_initial=0.01, backoff_max=1.0, max_restarts=2)
    await runtime.start(launch(tmp_path, "vanish", [str(script)], restart=policy))
    await until(lambda: rec.crash_loops, what="crash loop")
    assert rec.exited == [("vanish", 1, 0.01), ("vanish", None, 0.02), ("vanish", None, None)]
    assert rec.crash_loops == [("vanish", (
        f"vanish: cannot start '{script}': no such file or directory; "
        "restarted 2 times within 300s, not restarting (crash loop)"
    ))]
    assert [restarted for _, restarted in rec.started] == [False]
    await runtime.close(stop_apps=True)
    with pytest.raises(RuntimeFailure, match="closed"):
        await runtime.start(launch(tmp_path, "late", ["/bin/sleep", "1"]))


async def test_stop_cancels_a_pending_restart(tmp_path: Path) -> None:
    rec = Recorder()
    runtime = ProcessRuntime(rec)
    policy = RestartPolicy("always", backoff_initial=0.3, backoff_max=0.3)
    await runtime.start(launch(tmp_path, "flappy", ["/bin/sh", "-c", "exit 1"], restart=policy))
    await until(lambda: rec.exited, what="first exit")
    assert getattr(runtime.stats("flappy"), "state", None) == "backoff"
    await runtime.stop("flappy")
    await asyncio.sleep(0.5)
    assert len(rec.started) == 1 and runtime.names() == set()
    await runtime.close(stop_apps=True)


# --- adoption ---------------------------------------------------------------------------------


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "psutil-poll"])
async def test_adoption_across_runtime_restart(tmp_path: Path, use_pidfd: bool) -> None:
    app = launch(tmp_path, "kept", ["/bin/sleep", "60"],
                 restart=RestartPolicy("always", backoff_initial=0.01))
    first = ProcessRuntime(Recorder())
    record = await first.start(app)
    await first.close(stop_apps=False)
    assert alive(record.pid)

    rec = Recorder()
    second = ProcessRuntime(rec, poll_interval=0.05, use_pidfd=use_pidfd)
    assert second.adopt(app, record)
    stats = second.stats("kept")
    assert stats is not None and (stats.state, stats.pid) == ("running", record.pid)

    os.kill(record.pid, signal.SIGKILL)  # the adopted app crashes: the new runtime restarts it
    await until(lambda: rec.started, what="restarted")
    assert rec.exited == [("kept", None, 0.01)]
    new_record, restarted = rec.started[0]
    assert restarted and new_record.pid != record.pid and alive(new_record.pid)
    await second.close(stop_apps=True)
    assert not alive(new_record.pid)


AGENT = """
import asyncio, json, sys
from pathlib import Path
from reconciler.node.runtimes.base import LaunchSpec
from reconciler.node.runtimes.process import ProcessRuntime

class Quiet:
    def on_started(self, record, restarted): pass
    def on_exited(self, name, returncode, restart_in): pass
    def on_crash_loop(self, name, message): pass

async def main():
    root = Path(sys.argv[1])
    runtime = ProcessRuntime(Quiet())
    argv = ("/bin/sh", "-c", "while :; do echo tick; sleep 0.05; done")
    launch = LaunchSpec("survivor", "1.0", argv, {"PATH": "/usr/bin:/bin"}, root, root / "logs")
    record = await runtime.start(launch)
    print(json.dumps(vars(record)), flush=True)
    await asyncio.Event().wait()  # forever: killed -9 by the test, like a crashing agent

asyncio.run(main())
"""


async def test_app_survives_an_agent_killed_with_sigkill(tmp_path: Path) -> None:
    agent = await asyncio.create_subprocess_exec(
        PY, "-c", AGENT, str(tmp_path), stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    assert agent.stdout is not None
    record = ProcessRecord(**json.loads(await agent.stdout.readline()))
    agent.kill()
    await agent.wait()
    size = (tmp_path / "logs" / "survivor.log").stat().st_size
    await until(lambda: (tmp_path / "logs" / "survivor.log").stat().st_size > size + 20,
                what="the app keeps writing its log after the agent died")
    app = LaunchSpec("survivor", "1.0", ("/bin/sh",), {}, tmp_path, tmp_path / "logs")
    runtime = ProcessRuntime(Recorder())
    assert runtime.adopt(app, record)
    await runtime.stop("survivor")
    assert not alive(record.pid)


async def test_adopted_app_is_stopped_with_its_group(tmp_path: Path) -> None:
    app = launch(tmp_path, "tree", ["/bin/sh", "-c", "sleep 60 & sleep 60; wait"])
    first = ProcessRuntime(Recorder())
    record = await first.start(app)
    await first.close(stop_apps=False)
    second = ProcessRuntime(Recorder())
    assert second.adopt(app, record)
    await second.stop("tree")
    assert group_members(record.pgid) == []


async def test_pid_reuse_is_never_adopted(tmp_path: Path) -> None:
    app = launch(tmp_path, "reuse", ["/bin/sleep", "60"])
    first = ProcessRuntime(Recorder())
    record = await first.start(app)
    runtime = ProcessRuntime(Recorder())
    older = ProcessRecord(**{**vars(record), "create_time": record.create_time - 5.0})
    assert not runtime.adopt(app, older)  # same pid, another process's birth time
    await first.stop("reuse")
    assert not runtime.adopt(app, record)  # gone
    assert runtime.names() == set()
    await runtime.close(stop_apps=True)
    await first.close(stop_apps=True)


# --- logs -----------------------------------------------------------------------------------


async def test_logs_rotate_while_the_app_keeps_writing(tmp_path: Path) -> None:
    runtime = ProcessRuntime(Recorder(), log_max_bytes=1000, rotate_interval=0.05)
    record = await runtime.start(launch(tmp_path, "chatty", py("""
        import signal, sys, time
        signal.signal(signal.SIGUSR1, lambda *_: print("after rotation", flush=True))
        print("x" * 2000, flush=True)
        while True:
            time.sleep(1)
    """)))
    rotated = tmp_path / "logs" / "chatty.log.1"
    await until(
        lambda: rotated.exists() and "x" * 2000 in rotated.read_text(), what="log rotated"
    )
    os.kill(record.pid, signal.SIGUSR1)
    await until(
        lambda: log_text(tmp_path, "chatty") == "after rotation\n",
        what="the app writes at the start of the truncated log (O_APPEND, no hole)",
    )
    await runtime.close(stop_apps=True)


def test_rotate_log_keeps_n_generations(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    assert not rotate_log(path, max_bytes=10, keep=3)  # no log yet
    for generation in range(5):
        path.write_text(f"generation {generation}\n")
        assert rotate_log(path, max_bytes=10, keep=3)
    path.write_text("small")
    assert not rotate_log(path, max_bytes=10, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "app.log", "app.log.1", "app.log.2", "app.log.3"
    ]
    assert [(tmp_path / f"app.log.{i}").read_text() for i in (1, 2, 3)] == [
        "generation 4\n", "generation 3\n", "generation 2\n"
    ]


# --- descendants that leave the process group (issue #10.5) -----------------------------------

ESCAPER = """
import os, signal, sys, time
if os.fork() == 0:
    os.setsid()  # a daemon: out of the app's process group and session
    open(os.path.join(sys.argv[1], f"escaped-{os.getpid()}"), "w").close()
    signal.pause()
time.sleep(float(sys.argv[2])) if sys.argv[2] != "forever" else signal.pause()
sys.exit(1)
"""


def escaped_pids(tmp: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in tmp.glob("escaped-*")]


def live_escaped(tmp: Path) -> list[int]:
    return [pid for pid in escaped_pids(tmp) if alive(pid)]


async def test_a_child_that_calls_setsid_is_stopped_with_its_app(tmp_path: Path) -> None:
    runtime = ProcessRuntime(Recorder())
    await runtime.start(launch(tmp_path, "daemonizer", [PY, "-c", ESCAPER, str(tmp_path),
                                                        "forever"]))
    await until(lambda: live_escaped(tmp_path), what="the escaped child runs")
    [child] = live_escaped(tmp_path)
    assert os.getsid(child) == child  # really outside the app's session
    await runtime.stop("daemonizer")
    assert not alive(child)
    await runtime.close(stop_apps=True)


async def test_restarts_never_pile_up_escaped_children(tmp_path: Path) -> None:
    rec = Recorder()
    runtime = ProcessRuntime(rec)
    policy = RestartPolicy("always", backoff_initial=0.05, backoff_max=0.05, max_restarts=50)
    await runtime.start(launch(tmp_path, "leaky", [PY, "-c", ESCAPER, str(tmp_path), "0.3"],
                               restart=policy))
    await until(lambda: len(escaped_pids(tmp_path)) >= 4, what="three restarts")
    # each exit of the app stopped the child it left; at most the current one is alive
    assert len(live_escaped(tmp_path)) <= 1
    await runtime.stop("leaky")
    assert live_escaped(tmp_path) == []
    await runtime.close(stop_apps=True)


async def test_an_adopted_app_is_stopped_with_its_escaped_child(tmp_path: Path) -> None:
    first = ProcessRuntime(Recorder())
    spec = launch(tmp_path, "daemonizer", [PY, "-c", ESCAPER, str(tmp_path), "forever"])
    record = await first.start(spec)
    await until(lambda: live_escaped(tmp_path), what="the escaped child runs")
    await first.close(stop_apps=False)  # the agent goes away, the app stays
    second = ProcessRuntime(Recorder())
    assert second.adopt(spec, record)
    assert live_escaped(tmp_path)  # adoption keeps the app whole
    await second.stop("daemonizer")
    assert live_escaped(tmp_path) == [] and not alive(record.pid)
    await second.close(stop_apps=True)
