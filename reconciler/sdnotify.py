"""systemd sd_notify protocol (READY, STATUS, WATCHDOG, STOPPING) over NOTIFY_SOCKET; stdlib."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class SdNotifier:
    """Sends sd_notify datagrams to the socket systemd gave us; a no-op without one.

    Every send swallows OSError: a lost notification must never take the agent down (if
    systemd is gone there is nobody to tell, and the watchdog will act on its own).
    """

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SdNotifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (default: os.environ)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = _positive_int(env.get("WATCHDOG_USEC"))
        pid = _positive_int(env.get("WATCHDOG_PID"))
        return cls(address, usec, pid)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds within which systemd expects WATCHDOG=1, or None when no watchdog is set
        for this process (WATCHDOG_PID names another process, e.g. a wrapper shell)."""
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 1_000_000

    def notify(self, state: str) -> bool:
        """Send one raw datagram like "READY=1\\nSTATUS=..."; True if it was sent."""
        if self.address is None:
            return False
        address = self.address
        if address.startswith("@"):
            # Abstract namespace socket: Linux spells it with a leading NUL byte.
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall(state.encode())
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value else 0
    except ValueError:
        return None
    return number if number > 0 else None


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return " ".join(text.split())
