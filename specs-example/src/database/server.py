"""database: a tiny key-value store over HTTP, kept in sqlite."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any

import appkit

path = os.environ.get("KV_PATH", "kv.sqlite3")
db = sqlite3.connect(path, check_same_thread=False)
db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
db.commit()
lock = threading.Lock()


def put(key: str, body: Any) -> tuple[int, Any]:
    if not key:
        return 400, {"error": "PUT /kv/<key> with a JSON body"}
    with lock:
        db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, json.dumps(body)))
        db.commit()
    return 200, {"key": key}


def get(key: str, _body: Any) -> tuple[int, Any]:
    with lock:
        if not key or key.endswith("/"):
            rows = db.execute(
                "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                (key, key + "\uffff"),
            ).fetchall()
            return 200, {k: json.loads(v) for k, v in rows}
        row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    if row is None:
        return 404, {"error": f"no key {key!r}"}
    return 200, json.loads(row[0])


def health(_rest: str, _body: Any) -> tuple[int, Any]:
    with lock:
        count = db.execute("SELECT count(*) FROM kv").fetchone()[0]
    return 200, {"status": "ok", "version": appkit.RELEASE["version"], "keys": count}


if __name__ == "__main__":
    appkit.serve(
        appkit.port("DATABASE_PORT", 17102),
        {("GET", "/health"): health, ("PUT", "/kv/"): put, ("GET", "/kv/"): get},
    )
