"""State store: atomic change+event transactions, bounded outbox, 0600 files, read-only views."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from reconciler.core.events import make_event
from reconciler.core.ports import OutboxEntry
from reconciler.core.spec import AppSpec
from reconciler.core.state import CurrentApp, CurrentState
from reconciler.node.runtimes.base import ProcessRecord
from reconciler.node.store import (
    SPEC_HASH_SCHEME,
    AppRecord,
    Store,
    StoreError,
    load_current_state,
    read_snapshot,
    spec_to_json,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _spec(name: str = "web", version: str = "1.0", **extra: object) -> AppSpec:
    return AppSpec.model_validate({
        "name": name, "version": version,
        "run": {"command": ["python3", "app.py"], "env": {"TOKEN": "s3cret-value"}}, **extra,
    })


def _record(spec: AppSpec, **extra: object) -> AppRecord:
    return AppRecord(name=spec.name, version=spec.version, spec_json=spec_to_json(spec),
                     spec_hash=spec.spec_hash(), **extra)  # type: ignore[arg-type]


def _event(kind: str = "app.deployed", app: str = "web") -> object:
    return make_event(kind, "n1", NOW, app=app, outcome="success")


def test_change_and_event_commit_together_or_not_at_all(tmp_path: Path) -> None:
    store = Store(tmp_path)
    spec = _spec()
    with store.transaction():
        store.put_app(_record(spec, phase="running"))
        store.add_event(_event())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError), store.transaction():
        store.update_app("web", phase="failed")
        store.add_event(_event("app.failed"))  # type: ignore[arg-type]
        raise RuntimeError("crash between the change and the commit")
    app = store.get_app("web")
    assert app is not None and app.phase == "running"
    assert [e.subject for e in store.outbox_batch(10)] == ["gitops.events.n1.app.deployed"]
    assert store.outbox_stats() == (1, 0)
    store.close()
    # and it survives reopening
    reopened = Store(tmp_path)
    assert reopened.get_app("web") == app
    assert reopened.get_app("web").spec == spec  # type: ignore[union-attr]
    assert reopened.outbox_stats() == (1, 0)


def test_outbox_is_ordered_acked_and_bounded(tmp_path: Path) -> None:
    store = Store(tmp_path, outbox_max=3)
    events = [make_event("app.deployed", "n1", NOW, app=f"a{i}") for i in range(5)]
    for event in events:
        store.add_event(event)
    batch = store.outbox_batch(10)
    # the two oldest were dropped and counted
    assert [e.event_id for e in batch] == [e.id for e in events[2:]]
    assert batch[0] == OutboxEntry(seq=batch[0].seq, event_id=events[2].id,
                                   subject="gitops.events.n1.app.deployed",
                                   payload=events[2].to_json_bytes())
    assert store.outbox_stats() == (3, 2)
    store.outbox_ack([batch[0].seq, batch[2].seq])
    assert [e.event_id for e in store.outbox_batch(10)] == [events[3].id]
    assert store.outbox_stats() == (1, 2)
    store.outbox_ack([])
    # a seq is never reused after its entry was acked
    store.outbox_ack([e.seq for e in store.outbox_batch(10)])
    seq = store.add_event(events[0])
    assert seq > batch[2].seq


def test_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = Store(state)
    with store.transaction():
        store.put_app(_record(_spec()))
    for path in state.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_process_record_and_current_state(tmp_path: Path) -> None:
    store = Store(tmp_path)
    spec = _spec(depends_on=["db"])
    store.put_app(_record(spec, phase="running", health="healthy", failed_spec_hash="abc"))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        created = psutil.Process(proc.pid).create_time()
        store.set_process("web", ProcessRecord("web", "1.0", proc.pid, proc.pid, created))
        expected = CurrentState(apps={"web": CurrentApp(
            name="web", version="1.0", spec_hash=spec.spec_hash(), phase="running",
            health="healthy", running=True, alive=True, installed=False, depends_on=("db",),
            suspended=False, failed_spec_hash="abc", metadata_hash=spec.metadata_hash(),
        )})
        assert store.current_state() == expected
        assert load_current_state(tmp_path) == expected
        # a recorded pid whose create_time differs is someone else's process: not running
        store.set_process("web", ProcessRecord("web", "1.0", proc.pid, proc.pid, created - 5))
        assert load_current_state(tmp_path).apps["web"].running is False
        assert store.get_app("web").process.create_time == created - 5  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()
    store.set_process("web", None)
    assert store.get_app("web").process is None  # type: ignore[union-attr]
    assert store.current_state(running={"web"}).apps["web"].running is True


def test_read_only_views(tmp_path: Path) -> None:
    assert load_current_state(tmp_path / "none") == CurrentState()
    assert read_snapshot(tmp_path / "none") is None
    store = Store(tmp_path)
    store.set_meta("applied_revision", "abc123")
    store.set_meta("node_suspended", "1")
    store.add_event(_event())  # type: ignore[arg-type]
    snap = read_snapshot(tmp_path)
    assert snap is not None
    assert snap.meta == {"applied_revision": "abc123", "node_suspended": "1",
                         "spec_hash_scheme": SPEC_HASH_SCHEME}
    assert snap.outbox_backlog == 1
    assert store.node_suspended
    store.set_meta("node_suspended", None)
    assert not store.node_suspended


def test_not_a_store_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"state\.db"):
        Store(tmp_path)
    with pytest.raises(StoreError, match=r"state\.db"):
        read_snapshot(tmp_path)


def test_update_unknown_app_is_an_error(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(KeyError):
        store.update_app("ghost", phase="running")
    assert os.path.exists(tmp_path / "state.db")


def test_hashes_from_an_older_agent_are_recomputed_once_so_nothing_restarts(
        tmp_path: Path) -> None:
    """An agent upgrade that changes what spec_hash covers (metadata left out) must not
    make every installed app look changed, which would restart it."""
    store = Store(tmp_path)
    spec = _spec(labels={"tier": "web"})
    store.put_app(replace(_record(spec, phase="running"), spec_hash="0ld5c4eme0ld5c4e"))
    store.set_meta("spec_hash_scheme", None)  # as written by the older agent
    store.close()
    store = Store(tmp_path)
    assert store.get_app("web").spec_hash == spec.spec_hash()  # type: ignore[union-attr]
    assert load_current_state(tmp_path).apps["web"].spec_hash == spec.spec_hash()
    # once: a later hash is the agent's own and is kept as written
    store.update_app("web", spec_hash="kept")
    store.close()
    assert Store(tmp_path).get_app("web").spec_hash == "kept"  # type: ignore[union-attr]
