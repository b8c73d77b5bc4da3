"""Local state store (sqlite, WAL): app inventory, node meta and the event outbox."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from reconciler.agent_api import OutboxEntry
from reconciler.events import Event
from reconciler.runtimes.base import ProcessRecord
from reconciler.spec import AppSpec, metadata_hash_of
from reconciler.state import CurrentApp, CurrentState

DB_NAME = "state.db"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    install_dir TEXT,
    prev_version TEXT,
    prev_spec_json TEXT,
    prev_dir TEXT,
    phase TEXT NOT NULL DEFAULT 'pending',
    health TEXT NOT NULL DEFAULT 'unknown',
    message TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    pgid INTEGER,
    create_time REAL,
    proc_version TEXT,
    prev_pid INTEGER,
    prev_pgid INTEGER,
    prev_create_time REAL,
    restarts INTEGER NOT NULL DEFAULT 0,
    applied_revision TEXT,
    attempted_revision TEXT,
    failed_spec_hash TEXT,
    failed_version TEXT,
    suspended INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    payload BLOB NOT NULL,
    created TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class AppRecord:
    """One app's row. `spec_json` holds the full spec (env values included): it never leaves
    this 0600 file. `prev_*` is what to roll back to; `proc_version` is the version of the
    recorded process (differs from `version` while an upgrade is half done)."""

    name: str
    version: str
    spec_json: str
    spec_hash: str
    install_dir: str | None = None
    prev_version: str | None = None
    prev_spec_json: str | None = None
    prev_dir: str | None = None
    phase: str = "pending"
    health: str = "unknown"
    message: str = ""
    pid: int | None = None
    pgid: int | None = None
    create_time: float | None = None
    proc_version: str | None = None
    # the previous version's process while an upgrade has not stopped it yet
    prev_pid: int | None = None
    prev_pgid: int | None = None
    prev_create_time: float | None = None
    restarts: int = 0
    applied_revision: str | None = None
    attempted_revision: str | None = None
    failed_spec_hash: str | None = None
    failed_version: str | None = None
    suspended: bool = False
    updated_at: str | None = None

    @property
    def spec(self) -> AppSpec:
        return AppSpec.model_validate_json(self.spec_json)

    @property
    def prev_spec(self) -> AppSpec | None:
        return AppSpec.model_validate_json(self.prev_spec_json) if self.prev_spec_json else None

    @cached_property
    def _spec_dict(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.spec_json)
        return loaded

    @property
    def depends_on(self) -> tuple[str, ...]:
        return tuple(self._spec_dict.get("depends_on", []))

    @property
    def metadata_hash(self) -> str:
        return metadata_hash_of(self._spec_dict)

    @property
    def process(self) -> ProcessRecord | None:
        if self.pid is None or self.create_time is None:
            return None
        return ProcessRecord(
            name=self.name, version=self.proc_version or self.version, pid=self.pid,
            pgid=self.pgid if self.pgid is not None else self.pid, create_time=self.create_time,
        )

    @property
    def prev_process(self) -> ProcessRecord | None:
        if self.prev_pid is None or self.prev_create_time is None or not self.prev_version:
            return None
        return ProcessRecord(
            name=self.name, version=self.prev_version, pid=self.prev_pid,
            pgid=self.prev_pgid if self.prev_pgid is not None else self.prev_pid,
            create_time=self.prev_create_time,
        )

    def to_current(self, running: bool) -> CurrentApp:
        return CurrentApp(
            name=self.name, version=self.version, spec_hash=self.spec_hash,
            phase=self.phase,  # type: ignore[arg-type]
            health=self.health,  # type: ignore[arg-type]
            running=running, depends_on=self.depends_on, suspended=self.suspended,
            failed_spec_hash=self.failed_spec_hash, metadata_hash=self.metadata_hash,
        )


def spec_to_json(spec: AppSpec) -> str:
    return spec.model_dump_json(by_alias=True)


_COLUMNS = tuple(f.name for f in fields(AppRecord))


def _row_to_record(row: sqlite3.Row) -> AppRecord:
    values = {name: row[name] for name in _COLUMNS}
    values["suspended"] = bool(values["suspended"])
    return AppRecord(**values)


def _record_values(record: AppRecord) -> tuple[Any, ...]:
    return tuple(
        int(v) if isinstance(v, bool) else v for v in (getattr(record, c) for c in _COLUMNS)
    )


class StoreError(Exception):
    """The state store cannot be opened or is not ours."""


# Bumped when AppSpec.spec_hash covers other fields: stored hashes are recomputed on open.
SPEC_HASH_SCHEME = "2"


def db_path(state_dir: Path) -> Path:
    return Path(state_dir) / DB_NAME


class Store:
    """The agent's durable state. One connection, used from the event loop thread only.

    Every state change and the events describing it are written in one transaction
    (`with store.transaction(): ...`), so a crash never leaves a change without its event
    or an event for a change that did not happen."""

    def __init__(self, state_dir: Path, outbox_max: int = 100_000) -> None:
        self.state_dir = Path(state_dir)
        self.outbox_max = max(1, outbox_max)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # specs can hold secrets in env: the directory and the db are private to the agent
        os.chmod(self.state_dir, 0o700)
        path = db_path(self.state_dir)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: cannot open the state store: {exc}") from exc
        self._depth = 0
        # rows are read far more often than written (status, every reconcile); this one
        # connection is the only writer, so a cache dropped on every write stays true
        self._apps_cache: dict[str, AppRecord] | None = None
        self._outbox_count = self._count_outbox()
        self._rehash_specs()
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.chmod(side, 0o600)

    def close(self) -> None:
        self._db.close()

    def _rehash_specs(self) -> None:
        """Once per store: recompute spec_hash from the stored spec when AppSpec.spec_hash
        changed what it covers (scheme 2 left metadata out), so upgrading the agent does not
        reconfigure (restart) every app. A spec that no longer parses keeps its hash."""
        if self.get_meta("spec_hash_scheme") == SPEC_HASH_SCHEME:
            return
        with self.transaction():
            for name, record in self._all_apps().items():
                try:
                    digest = record.spec.spec_hash()
                except ValueError:
                    continue
                if digest != record.spec_hash:
                    self.update_app(name, spec_hash=digest)
            self.set_meta("spec_hash_scheme", SPEC_HASH_SCHEME)

    # -- transactions -------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all. Nested blocks join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self._db.execute("ROLLBACK")
            self._apps_cache = None
            self._outbox_count = self._count_outbox()
            raise
        self._depth = 0
        self._db.execute("COMMIT")

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self.transaction():
            return self._db.execute(sql, params)

    # -- apps ---------------------------------------------------------------------------
    def get_app(self, name: str) -> AppRecord | None:
        return self._all_apps().get(name)

    def apps(self) -> dict[str, AppRecord]:
        """Every app row by name (sorted); a fresh dict the caller may keep."""
        return dict(self._all_apps())

    def _all_apps(self) -> dict[str, AppRecord]:
        if self._apps_cache is None:
            rows = self._db.execute("SELECT * FROM apps ORDER BY name").fetchall()
            self._apps_cache = {row["name"]: _row_to_record(row) for row in rows}
        return self._apps_cache

    def _apps_changed(self) -> None:
        self._apps_cache = None

    def put_app(self, record: AppRecord) -> AppRecord:
        placeholders = ",".join("?" for _ in _COLUMNS)
        self._write(
            f"INSERT OR REPLACE INTO apps ({','.join(_COLUMNS)}) VALUES ({placeholders})",
            _record_values(record),
        )
        self._apps_changed()
        return record

    def update_app(self, name: str, **changes: Any) -> AppRecord:
        """Change some fields of an existing app row; returns the new record."""
        current = self.get_app(name)
        if current is None:
            raise KeyError(name)
        return self.put_app(replace(current, **changes))

    def set_process(self, name: str, record: ProcessRecord | None) -> None:
        self._apps_changed()
        if record is None:
            self._write(
                "UPDATE apps SET pid=NULL, pgid=NULL, create_time=NULL, proc_version=NULL "
                "WHERE name=?", (name,),
            )
        else:
            self._write(
                "UPDATE apps SET pid=?, pgid=?, create_time=?, proc_version=? WHERE name=?",
                (record.pid, record.pgid, record.create_time, record.version, name),
            )

    def delete_app(self, name: str) -> None:
        self._write("DELETE FROM apps WHERE name = ?", (name,))
        self._apps_changed()

    # -- meta ---------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self._write("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self._write("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def node_suspended(self) -> bool:
        return self.get_meta("node_suspended") == "1"

    # -- outbox (agent_api.Outbox) --------------------------------------------------------
    def add_event(self, event: Event) -> int:
        """Queue an event for NATS (inside the caller's transaction); returns its seq."""
        with self.transaction():
            cursor = self._db.execute(
                "INSERT INTO outbox (event_id, subject, payload, created) VALUES (?,?,?,?)",
                (event.id, event.subject, event.to_json_bytes(), event.time),
            )
            self._outbox_count += 1
            overflow = self._outbox_count - self.outbox_max
            if overflow > 0:
                # bounded: a long NATS outage drops the oldest events, and says how many
                deleted = self._db.execute(
                    "DELETE FROM outbox WHERE seq IN "
                    "(SELECT seq FROM outbox ORDER BY seq LIMIT ?)", (overflow,),
                ).rowcount
                self._outbox_count -= deleted
                dropped = int(self.get_meta("outbox_dropped", "0") or 0) + deleted
                self.set_meta("outbox_dropped", str(dropped))
            return int(cursor.lastrowid or 0)

    def outbox_batch(self, limit: int) -> list[OutboxEntry]:
        rows = self._db.execute(
            "SELECT seq, event_id, subject, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [
            OutboxEntry(seq=r["seq"], event_id=r["event_id"], subject=r["subject"],
                        payload=bytes(r["payload"]))
            for r in rows
        ]

    def outbox_ack(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self.transaction():
            for start in range(0, len(seqs), 500):
                chunk = seqs[start:start + 500]
                marks = ",".join("?" for _ in chunk)
                deleted = self._db.execute(
                    f"DELETE FROM outbox WHERE seq IN ({marks})", tuple(chunk)
                ).rowcount
                self._outbox_count -= deleted

    def outbox_stats(self) -> tuple[int, int]:
        return self._outbox_count, int(self.get_meta("outbox_dropped", "0") or 0)

    def _count_outbox(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    # -- views ----------------------------------------------------------------------------
    def current_state(self, running: set[str] | None = None) -> CurrentState:
        """CurrentState for the planner; `running` names apps with a live process (from the
        runtime); None: judge from the recorded pids."""
        records = self.apps()
        alive = running if running is not None else _alive_from_records(records)
        return CurrentState(apps={n: r.to_current(n in alive) for n, r in records.items()})


def meta_float(text: str | None) -> float | None:
    """A number kept as text in the meta table; None when absent or unreadable."""
    try:
        return float(text) if text else None
    except ValueError:
        return None


def pid_alive(pid: int | None, create_time: float | None) -> bool:
    """True when `pid` runs and is the process we recorded (create_time guards pid reuse)."""
    if not pid:
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.05
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _alive_from_records(records: dict[str, AppRecord]) -> set[str]:
    return {n for n, r in records.items() if pid_alive(r.pid, r.create_time)}


@dataclass(frozen=True)
class StoreSnapshot:
    """A read-only look at a store: apps, meta and outbox stats (for `status` and `plan`)."""

    apps: dict[str, AppRecord]
    meta: dict[str, str]
    outbox_backlog: int


def read_snapshot(state_dir: Path) -> StoreSnapshot | None:
    """Open the store read-only; None when there is no store in `state_dir`."""
    path = db_path(Path(state_dir))
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.OperationalError as exc:
        raise StoreError(f"{path}: cannot open the state store: {exc}") from exc
    db.row_factory = sqlite3.Row
    try:
        apps = {r["name"]: _row_to_record(r)
                for r in db.execute("SELECT * FROM apps ORDER BY name")}
        meta = {r["key"]: r["value"] for r in db.execute("SELECT key, value FROM meta")}
        backlog = int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a gitops-mesh state store: {exc}") from exc
    finally:
        db.close()
    return StoreSnapshot(apps=apps, meta=meta, outbox_backlog=backlog)


def load_current_state(state_dir: Path) -> CurrentState:
    """The current state recorded in `state_dir` (read-only); empty when there is no store.
    An app counts as running when its recorded process is alive."""
    snapshot = read_snapshot(Path(state_dir))
    if snapshot is None:
        return CurrentState()
    alive = _alive_from_records(snapshot.apps)
    return CurrentState(apps={n: r.to_current(n in alive) for n, r in snapshot.apps.items()})
