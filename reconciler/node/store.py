"""Local state store (sqlite, WAL): app inventory, node meta and the event outbox."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from reconciler.core.errors import TransientError
from reconciler.core.events import Event
from reconciler.core.ports import OutboxEntry
from reconciler.core.spec import AppSpec, metadata_hash_of
from reconciler.core.state import CurrentApp, CurrentState
from reconciler.core.states import Health, Phase
from reconciler.core.status import NodeMeta
from reconciler.node.runtimes.base import ProcessRecord
from reconciler.node.runtimes.process import pid_alive

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
    attempted_revision TEXT, -- no longer written; kept so stores stay readable both ways
    failed_spec_hash TEXT,
    failed_version TEXT,
    suspended INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT,
    upgrade_intent TEXT -- JSON UpgradeIntent while phase is upgrading
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
class UpgradeIntent:
    """A replace under way, durable: from and to versions, the health deadline (epoch
    seconds), when it began, its strategy, the revision it applies and the event it records
    on success. Written with the move to `upgrading`, cleared with its outcome."""

    from_version: str
    to_version: str
    deadline: float
    started: float
    strategy: str
    revision: str
    event: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UpgradeIntent:
        return cls(**json.loads(text))


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
    phase: Phase = "pending"
    health: Health = "unknown"
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
    failed_spec_hash: str | None = None
    failed_version: str | None = None
    suspended: bool = False
    updated_at: str | None = None
    # JSON of UpgradeIntent while an upgrade/reconfigure is under way: what the next agent
    # needs to finish its health wait or roll it back after a crash
    upgrade_intent: str | None = None

    @property
    def intent(self) -> UpgradeIntent | None:
        return UpgradeIntent.from_json(self.upgrade_intent) if self.upgrade_intent else None

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

    def to_current(self, running: bool, alive: bool) -> CurrentApp:
        return CurrentApp(
            name=self.name, version=self.version, spec_hash=self.spec_hash,
            phase=self.phase, health=self.health, running=running, alive=alive,
            installed=self.install_dir is not None, depends_on=self.depends_on,
            suspended=self.suspended,
            failed_spec_hash=self.failed_spec_hash, metadata_hash=self.metadata_hash,
        )


def spec_to_json(spec: AppSpec) -> str:
    return spec.model_dump_json(by_alias=True)


_COLUMNS = tuple(f.name for f in fields(AppRecord))


_COLUMN_SET = frozenset(_COLUMNS)


def _row_to_record(row: sqlite3.Row) -> AppRecord:
    # by the row's own columns: a store of an older agent read without migrating
    # (read_snapshot) lacks the newer ones, which keep their defaults
    values = {k: v for k, v in zip(row.keys(), row, strict=True) if k in _COLUMN_SET}
    values["suspended"] = bool(values["suspended"])
    return AppRecord(**values)


def _record_values(record: AppRecord) -> tuple[Any, ...]:
    return tuple(
        int(v) if isinstance(v, bool) else v for v in (getattr(record, c) for c in _COLUMNS)
    )


class StoreError(Exception):
    """The state store cannot be opened or is not ours."""


# Below this much free space a run changes nothing: its records might not fit.
MIN_FREE_BYTES = 1024 * 1024


class StoreWriteError(TransientError):
    """A write to the state store failed (a full disk, an I/O error): nothing of that
    transaction was written. Passes when the disk has room again."""


# Bumped when AppSpec.spec_hash covers other fields: stored hashes are recomputed on open.
SPEC_HASH_SCHEME = "3"  # 3: upgrade.strategy joined the spec


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
            self._add_missing_columns()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: cannot open the state store: {exc}") from exc
        self._depth = 0
        # rows are read far more often than written (status, every reconcile); this one
        # connection is the only writer, so a cache dropped on every write stays true
        self._apps_cache: dict[str, AppRecord] | None = None
        self._apps_sorted = True  # the cache is in name order (apps() promises it)
        self._meta_cache: dict[str, str] | None = None  # likewise for the meta rows
        # stored spec JSON -> parsed spec: status reads every app's spec, often
        self._specs: dict[str, AppSpec] = {}
        self._outbox_count = self._count_outbox()
        self._rehash_specs()
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.chmod(side, 0o600)

    def close(self) -> None:
        self._db.close()

    def _add_missing_columns(self) -> None:
        """Columns added since a store was created (CREATE TABLE IF NOT EXISTS keeps old ones)."""
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(apps)")}
        for column in ("upgrade_intent",):
            if column not in have:
                self._db.execute(f"ALTER TABLE apps ADD COLUMN {column} TEXT")

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
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreWriteError(f"state store: {exc}") from exc
        self._depth = 1
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as exc:
            self._depth = 0
            with contextlib.suppress(sqlite3.Error):  # sqlite may have rolled back itself
                self._db.execute("ROLLBACK")
            self._apps_cache = None
            self._meta_cache = None
            self._outbox_count = self._count_outbox()
            if isinstance(exc, sqlite3.Error):
                raise StoreWriteError(f"state store: {exc}") from exc
            raise
        self._depth = 0

    def check_writable(self) -> None:
        """Raise StoreWriteError now if the disk under the store is (nearly) full, before any
        app is touched: a change whose record cannot be written must not start. (statvfs,
        not a test write: a synchronous commit on every run would cost the hot path.)"""
        try:
            st = os.statvfs(self.state_dir)
        except OSError as exc:
            raise StoreWriteError(f"state store: {exc.strerror or exc}") from exc
        free = st.f_bavail * st.f_frsize
        if free < MIN_FREE_BYTES:
            raise StoreWriteError(
                f"state store: database or disk is full ({free} bytes free under "
                f"{self.state_dir})")

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
            self._apps_sorted = True
        elif not self._apps_sorted:
            self._apps_cache = dict(sorted(self._apps_cache.items()))
            self._apps_sorted = True
        return self._apps_cache

    def spec_of(self, record: AppRecord) -> AppSpec:
        """The record's spec, parsed once per distinct spec."""
        spec = self._specs.get(record.spec_json)
        if spec is None:
            if len(self._specs) > 4096:
                self._specs.clear()
            spec = self._specs[record.spec_json] = record.spec
        return spec

    def _cached(self, record: AppRecord) -> None:
        """Keep the rows cache true after writing `record` (a rollback drops the cache), so
        a write costs one row, not a re-read of every row."""
        cache = self._apps_cache
        if cache is None:
            return
        if record.name not in cache:
            self._apps_sorted = False
        cache[record.name] = record

    def put_app(self, record: AppRecord) -> AppRecord:
        placeholders = ",".join("?" for _ in _COLUMNS)
        self._write(
            f"INSERT OR REPLACE INTO apps ({','.join(_COLUMNS)}) VALUES ({placeholders})",
            _record_values(record),
        )
        self._cached(record)
        return record

    def update_app(self, name: str, **changes: Any) -> AppRecord:
        """Change some fields of an existing app row; returns the new record."""
        current = self.get_app(name)
        if current is None:
            raise KeyError(name)
        return self.put_app(replace(current, **changes))

    def set_process(self, name: str, record: ProcessRecord | None) -> None:
        current = self.get_app(name)
        if current is not None:
            self._cached(replace(
                current, pid=record.pid if record else None,
                pgid=record.pgid if record else None,
                create_time=record.create_time if record else None,
                proc_version=record.version if record else None,
            ))
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
        if self._apps_cache is not None:
            self._apps_cache.pop(name, None)

    # -- meta ---------------------------------------------------------------------------
    def _meta(self) -> dict[str, str]:
        if self._meta_cache is None:
            rows = self._db.execute("SELECT key, value FROM meta").fetchall()
            self._meta_cache = {row["key"]: row["value"] for row in rows}
        return self._meta_cache

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        return self._meta().get(key, default)

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self._write("DELETE FROM meta WHERE key = ?", (key,))
            self._meta().pop(key, None)
        else:
            self._write("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
            self._meta()[key] = value

    def node_meta(self) -> NodeMeta:
        """The node-wide facts, typed (core.status.NodeMeta knows the keys)."""
        return NodeMeta.from_rows(self._meta())

    def update_meta(self, **changes: Any) -> NodeMeta:
        """Change some NodeMeta fields (one transaction; unchanged rows are not written)."""
        old = self.node_meta()
        new = old.changed(**changes)
        with self.transaction():
            for key, text in new.to_rows(changes).items():
                if self._meta().get(key) != text:
                    self.set_meta(key, text)
        return new

    @property
    def node_suspended(self) -> bool:
        return self.node_meta().suspended

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
                self.update_meta(outbox_dropped=self.node_meta().outbox_dropped + deleted)
            return int(cursor.lastrowid or 0)

    def outbox_batch(self, limit: int, after: int = 0) -> list[OutboxEntry]:
        cursor = self._db.execute(
            "SELECT seq, event_id, subject, payload FROM outbox WHERE seq > ? ORDER BY seq "
            "LIMIT ?", (after, limit))
        cursor.row_factory = None  # plain tuples: cheaper than by-name sqlite3.Row access
        return [OutboxEntry(seq, event_id, subject, bytes(payload))
                for seq, event_id, subject, payload in cursor.fetchall()]

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
        return self._outbox_count, self.node_meta().outbox_dropped

    def _count_outbox(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    # -- views ----------------------------------------------------------------------------
    def current_state(
        self, running: set[str] | None = None, alive: set[str] | None = None,
    ) -> CurrentState:
        """CurrentState for the planner. `running` names the apps that are up (see
        CurrentApp.running) and `alive` those with a live process (both from the runtime);
        None: judge from the recorded pids."""
        return _current_state(self.apps(), running, alive)


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
    An app counts as running and alive when its recorded process is alive."""
    snapshot = read_snapshot(Path(state_dir))
    if snapshot is None:
        return CurrentState()
    return _current_state(snapshot.apps, None, None)


def _current_state(
    records: dict[str, AppRecord], running: set[str] | None, alive: set[str] | None,
) -> CurrentState:
    """`running`/`alive` None: an app is both when its recorded process is alive (a store
    read without the runtime cannot see restart backoff)."""
    if running is None or alive is None:
        recorded = _alive_from_records(records)
        running = recorded if running is None else running
        alive = recorded if alive is None else alive
    return CurrentState(
        apps={n: r.to_current(n in running, n in alive) for n, r in records.items()}
    )
