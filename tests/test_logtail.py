"""Bounded log reads for the logs RPC: the tail, a follower's cursor, rotation; and the
request body the node accepts."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from reconciler.mesh.wire import BadRequest, LogsRequest, parse_logs_body
from reconciler.node.logtail import MARK_BYTES, MAX_BYTES, MAX_LINES, LogChunk, read_log
from reconciler.node.runtimes.process import rotate_log


def write(log_dir: Path, text: bytes, name: str = "web") -> Path:
    log_dir.mkdir(exist_ok=True)
    path = log_dir / f"{name}.log"
    with path.open("ab") as f:
        f.write(text)
    return path


def cursor(path: Path, offset: int | None = None) -> str:
    """The cursor of `path` at `offset` (default: its end), as read_log makes it."""
    st = os.stat(path)
    at = st.st_size if offset is None else offset
    data = path.read_bytes()[:at]
    return f"{st.st_ino}:{at}:{zlib.crc32(data[-MARK_BYTES:]):08x}"


def test_tail_is_bounded_by_lines_and_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, b"".join(b"line %d\n" % i for i in range(5000)))
    assert read_log(tmp_path, "web", 3) == LogChunk(
        ["line 4997", "line 4998", "line 4999"], cursor(path), truncated=True)
    assert len(read_log(tmp_path, "web", 10**6).lines) == MAX_LINES
    wide = write(tmp_path, b"".join(b"%05d " % i + b"w" * 200 + b"\n" for i in range(2000)),
                 name="wide")
    chunk = read_log(tmp_path, "wide", MAX_LINES)
    assert sum(len(line) + 1 for line in chunk.lines) <= MAX_BYTES
    assert chunk.lines[-1].startswith("01999 ") and chunk.truncated
    assert all(len(line) == 206 for line in chunk.lines)  # no line cut by the byte bound
    assert chunk.cursor == cursor(wide)
    assert read_log(tmp_path, "web", 10) != read_log(tmp_path, "nope", 10)
    assert read_log(tmp_path, "nope", 10) == LogChunk([], "0:0")  # no log yet


def test_a_follower_gets_only_new_complete_lines(tmp_path: Path) -> None:
    path = write(tmp_path, b"old 1\nold 2\n")
    first = read_log(tmp_path, "web", 1)
    assert (first.lines, first.truncated) == (["old 2"], True)
    write(tmp_path, b"new 1\nnew 2\nhalf")
    second = read_log(tmp_path, "web", 100, first.cursor)
    assert second == LogChunk(["new 1", "new 2"], cursor(path, 24))
    assert read_log(tmp_path, "web", 100, second.cursor).lines == []  # "half" waits
    write(tmp_path, b" done\n")
    assert read_log(tmp_path, "web", 100, second.cursor).lines == ["half done"]
    # more than the bounds: a page at a time, `more` until caught up
    write(tmp_path, b"".join(b"x%d\n" % i for i in range(2500)))
    pages, at, more = [], cursor(path, path.stat().st_size - len(b"".join(
        b"x%d\n" % i for i in range(2500)))), True
    while more:
        page = read_log(tmp_path, "web", MAX_LINES, at)
        pages.append(len(page.lines))
        at, more = page.cursor, page.more
    assert pages == [1000, 1000, 500]


def test_one_line_longer_than_the_bound_comes_in_pieces(tmp_path: Path) -> None:
    write(tmp_path, b"")
    start = read_log(tmp_path, "web", 10).cursor
    write(tmp_path, b"z" * (MAX_BYTES + 10) + b"\n")
    piece = read_log(tmp_path, "web", 10, start)
    assert piece.lines == ["z" * MAX_BYTES] and piece.more
    assert read_log(tmp_path, "web", 10, piece.cursor).lines == ["z" * 10]


def test_the_cursor_survives_rotation_and_a_replaced_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"a\n")
    at = read_log(tmp_path, "web", 10).cursor
    write(tmp_path, b"b before rotation\n")
    assert rotate_log(path, max_bytes=1)  # copytruncate: web.log.1 has a, b
    write(tmp_path, b"c after\n")
    rest = read_log(tmp_path, "web", 10, at)
    assert rest.lines == ["b before rotation"] and rest.more
    assert read_log(tmp_path, "web", 10, rest.cursor).lines == ["c after"]
    # the app redeployed onto a new file (another inode): from its start
    path.unlink()
    write(tmp_path, b"fresh\n")
    assert read_log(tmp_path, "web", 10, rest.cursor).lines == ["fresh"]
    with pytest.raises(ValueError, match="invalid cursor"):
        read_log(tmp_path, "web", 10, "nonsense")


def test_logs_request_body() -> None:
    apps = ["web", "db"]
    assert parse_logs_body(b'{"app": "web"}', apps) == LogsRequest("web", 100, None)
    assert parse_logs_body(b'{"app": "db", "lines": 5, "cursor": "12:34:0a1b2c3d"}', apps) \
        == LogsRequest("db", 5, "12:34:0a1b2c3d")
    for body, message in [
        (b"", "'app' is required"),
        (b'{"app": "cache"}', "unknown app 'cache'; this node has: db, web"),
        (b'{"app": "web", "lines": 0}', "'lines' must be a whole number"),
        (b'{"app": "web", "lines": true}', "'lines' must be a whole number"),
        (b'{"app": "web", "lines": "5"}', "'lines' must be a whole number"),
        (b'{"app": "web", "cursor": "../x"}', "'cursor' '../x': pass back"),
        (b'{"app": "web", "path": "/etc/passwd"}', r"unknown field\(s\) path"),
    ]:
        with pytest.raises(BadRequest, match=message):
            parse_logs_body(body, apps)
