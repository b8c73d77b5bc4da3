"""Reading files that a spec names (env files, file:// archives): regular files only, bounded.

A spec may name any path on the node: a FIFO that never delivers would hang the reconcile,
a device that never ends (/dev/zero) would fill the agent's memory."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


class RefusedFile(ValueError):
    """The file is not something the agent reads: not a regular file, or too large."""


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading if it is a regular file (opening never waits: O_NONBLOCK);
    raises OSError when it cannot be opened, RefusedFile when it is not a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RefusedFile("not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The whole content of a regular file of at most `max_bytes`."""
    with open_regular(path) as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RefusedFile(f"larger than {max_bytes} bytes")
    return data
