"""sd_notify against a real AF_UNIX datagram socket, as systemd would listen on one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.node.sdnotify import SdNotifier
from tests.conftest import make_spec_repo


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_messages_reach_the_socket_in_order(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    notifier = SdNotifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.status("fetching\nrevision abc")
    assert notifier.ready("3 apps running")
    assert notifier.watchdog()
    assert notifier.stopping()
    received = [sock.recv(4096).decode() for _ in range(4)]
    assert received == [
        "STATUS=fetching revision abc",
        "READY=1\nSTATUS=3 apps running",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_abstract_namespace_socket() -> None:
    name = f"gitops-mesh-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = SdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    notifier = SdNotifier.from_env({})
    assert not notifier.enabled
    assert [notifier.ready(), notifier.status("x"), notifier.watchdog(), notifier.stopping()] == [
        False, False, False, False,
    ]
    assert notifier.watchdog_interval() is None


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = SdNotifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.ready() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another pid
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert SdNotifier.from_env({"NOTIFY_SOCKET": "/run/x", **env}).watchdog_interval() == expected


def test_the_agent_speaks_sd_notify_as_the_systemd_unit_expects(
    tmp_path: Path, listener: tuple[str, socket.socket]
) -> None:
    """A real `gitops-mesh node` under a fake systemd: READY=1 after the first reconcile,
    WATCHDOG=1 while it runs, STOPPING=1 on SIGTERM (Type=notify, WatchdogSec=)."""
    path, sock = listener
    repo = make_spec_repo(tmp_path / "specs", {"apps/hello.yaml": 'name: hello\nversion: "1"\n'})
    env = {
        **os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    agent = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "node", "--repo", repo.url, "--node-id", "n1",
         "--state-dir", str(tmp_path / "state"), "--interval", "1h"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    received: list[str] = []
    try:
        sock.settimeout(30)

        def receive_until(prefix: str) -> str:
            while True:
                message = sock.recv(4096).decode()
                received.append(message)
                if message.startswith(prefix):
                    return message

        ready = receive_until("READY=1")
        assert "STATUS=first reconcile: success" in ready, received
        receive_until("WATCHDOG=1")
        agent.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    assert not any("READY=1" in m for m in received[received.index(ready) + 1:]), received
