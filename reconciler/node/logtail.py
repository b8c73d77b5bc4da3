"""Bounded reads of an app's log file (`<state>/logs/<app>.log`) for the `logs` RPC.

Only the end of a file is ever read: the last lines of a 10 MB log cost one seek and at most
MAX_BYTES. A follower passes back the `cursor` of its last answer and gets only what was
written since, again at most MAX_LINES lines and MAX_BYTES. The cursor is
"<inode>:<offset>:<mark>", mark = crc32 of the MARK_BYTES before the offset. The runtime
rotates by copytruncate (reconciler.node.runtimes.process.rotate_log): the file keeps its
inode, so a size below the offset, or other bytes before it (the new file grew past the old
offset), means it was rotated; the rest of the old content is then read from `<app>.log.1`
before the follower moves on to the new file.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

MAX_LINES = 1000
MAX_BYTES = 64 * 1024
DEFAULT_LINES = 100
MARK_BYTES = 32


@dataclass(frozen=True)
class LogChunk:
    lines: list[str]
    cursor: str  # pass back to get what follows
    more: bool = False  # more is already written after the cursor: ask again at once
    truncated: bool = False  # older lines exist that the bounds left out

    def to_json(self, node: str, app: str) -> dict[str, Any]:
        return {"node": node, "app": app, "lines": self.lines, "cursor": self.cursor,
                "more": self.more, "truncated": self.truncated}


def app_log_path(log_dir: Path, app: str) -> Path:
    """Where the process runtime writes an app's stdout and stderr."""
    return log_dir / f"{app}.log"


def read_log(log_dir: Path, app: str, lines: int = DEFAULT_LINES,
             cursor: str | None = None) -> LogChunk:
    """The last `lines` lines (no cursor), or the lines written after `cursor`; both bounded
    by MAX_LINES and MAX_BYTES. A log that does not exist (yet) reads as empty."""
    lines = max(1, min(lines, MAX_LINES))
    position = None if cursor is None else parse_cursor(cursor)
    path = app_log_path(log_dir, app)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return LogChunk([], "0:0")
    with f:
        st = os.fstat(f.fileno())
        if position is None:
            return _tail(f, st.st_ino, st.st_size, lines)
        inode, offset, mark = position
        if inode != st.st_ino:  # another file (the app's log was replaced): from its start
            offset = 0
        elif offset > st.st_size or (mark is not None and _mark(f, offset) != mark):
            rest = _rest_of_rotated(path, offset, mark, lines)  # rotated since the last answer
            if rest is not None and rest.lines:
                # the new file from its start next time; what did not fit is skipped
                return LogChunk(rest.lines, f"{st.st_ino}:0", more=True,
                                truncated=rest.more)
            offset = 0
        return _forward(f, st.st_ino, offset, st.st_size, lines)


def parse_cursor(cursor: str) -> tuple[int, int, str | None]:
    """"<inode>:<offset>[:<mark>]" -> (inode, offset, mark); ValueError for anything else."""
    parts = cursor.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"invalid cursor {cursor!r} (pass back the one of the last answer)")
    return int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else None


def _mark(f: BinaryIO, offset: int) -> str:
    """A fingerprint of the bytes just before `offset` (tells a rotated file from ours)."""
    start = max(0, offset - MARK_BYTES)
    f.seek(start)
    return format(zlib.crc32(f.read(offset - start)), "08x")


def _cursor(f: BinaryIO, inode: int, offset: int) -> str:
    return f"{inode}:{offset}:{_mark(f, offset)}"


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _tail(f: BinaryIO, inode: int, size: int, lines: int) -> LogChunk:
    start = max(0, size - MAX_BYTES)
    f.seek(start)
    raw = f.read(size - start)
    if start > 0:
        newline = raw.find(b"\n")
        # the first line was cut by the byte bound: drop it, unless it is all there is
        if 0 <= newline < len(raw) - 1:
            raw = raw[newline + 1:]
    found = _decode(raw).splitlines()
    return LogChunk(found[-lines:], _cursor(f, inode, size),
                    truncated=start > 0 or len(found) > lines)


def _forward(f: BinaryIO, inode: int, offset: int, size: int, lines: int) -> LogChunk:
    f.seek(offset)
    raw = f.read(min(size, offset + MAX_BYTES) - offset)
    complete = raw.split(b"\n")[:-1]  # a line still being written waits for its newline
    taken = complete[:lines]
    used = sum(len(line) + 1 for line in taken)
    if not complete and len(raw) == MAX_BYTES:  # one line longer than the bound: a piece
        taken, used = [raw], len(raw)
    end = offset + used
    # more: lines the bounds left for the next call, or bytes not read at all yet
    more = len(complete) > len(taken) or offset + len(raw) < size
    return LogChunk([_decode(line) for line in taken], _cursor(f, inode, end), more=more)


def _rest_of_rotated(path: Path, offset: int, mark: str | None,
                     lines: int) -> LogChunk | None:
    """Lines after `offset` in `<app>.log.1`, the copy the last rotation made, or None when
    that copy is not the file the cursor was in."""
    try:
        f = path.with_name(path.name + ".1").open("rb")
    except FileNotFoundError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < offset or (mark is not None and _mark(f, offset) != mark):
            return None
        return _forward(f, 0, offset, size, lines)
