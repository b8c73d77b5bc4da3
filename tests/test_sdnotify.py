"""sd_notify against a real AF_UNIX datagram socket, as systemd would listen on one."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.sdnotify import SdNotifier


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
