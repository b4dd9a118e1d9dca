"""A checkpoint must not stall the trio thread (review s6, item 2).

The relay mailbox path commits on the trio thread (LogService.ingest) under the store's
write lock. The idle TRUNCATE (meshd/store/checkpoint.py) took that lock and then waited for
readers to leave the WAL (up to WRITER_WAIT_MS, 250 ms): a reader's snapshot stalled the event
loop that long; so did the writer's own RESTART at the hard bound, run by the group commit's
writer thread under the same lock. Nothing may hold the write lock while it waits for readers.

Event-driven: a reader holds a snapshot in the WAL; a checkpoint meets it; the ingest must
return while the snapshot is still held. main's wait for readers is made longer than the test
(WRITER_WAIT_MS; this checkpointer has none): a checkpoint that waited under the lock would
keep the ingest until the guard releases the snapshot, and the test fails.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshd.net.logsync import LogService
from meshd.protocol.log import PUT, Write, compose_batch
from meshd.store import checkpoint
from meshd.store import db as db_module
from meshd.store.checkpoint import wal_bytes

from ..protocol.test_log import WALL_MS, allow_all, signer
from .test_logsync import service

AUTHOR = signer(3)
# Deadlock guard only (the ingest waiting for the snapshot): no figure is asserted.
GUARD_S = 10.0


def from_peer(peer: LogService) -> dict[str, Any]:
    """A new entry by AUTHOR, as a 'log.entries' message from the peer that holds it."""
    seq, hash = peer.store.tip(bytes(AUTHOR.public))
    peer.store.commit_batch(compose_batch(AUTHOR, seq, hash, 0, WALL_MS + seq,
                                          [Write("s", f"r{seq}", PUT, b"x")]), durable=False)
    message = peer.batch_since(bytes(AUTHOR.public), seq, 1 << 20)
    assert message is not None
    return message


def ingest_with_guard(reader: sqlite3.Connection, ingest: Callable[[], int]) -> bool:
    """Run ingest (what the trio thread runs) while reader holds its snapshot; whether the
    guard had to release the snapshot for it to return (a deadlock guard, not a figure)."""
    returned, released = threading.Event(), threading.Event()

    def guard() -> None:
        if not returned.wait(GUARD_S):
            released.set()
            reader.execute("COMMIT")

    guarding = threading.Thread(target=guard)
    guarding.start()
    try:
        assert ingest() == 1
    finally:
        returned.set()
        guarding.join()
    return released.is_set()


def test_an_ingest_returns_while_the_idle_checkpoint_meets_a_reader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "IDLE_S", 0.0)  # idle as soon as a commit is done
    monkeypatch.setattr(checkpoint, "WRITER_WAIT_MS", 3_600_000, raising=False)  # main's waits
    truncating = threading.Event()
    real_checkpoint = checkpoint.Checkpointer._checkpoint  # noqa: SLF001

    def spy(self: checkpoint.Checkpointer, db: sqlite3.Connection, mode: str) -> None:
        if mode == "TRUNCATE":
            truncating.set()
        real_checkpoint(self, db, mode)

    monkeypatch.setattr(checkpoint.Checkpointer, "_checkpoint", spy)
    logs, peer = service(tmp_path, 2), service(tmp_path, 4)
    store = logs.store
    reader = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    with store.write_lock:  # no idle TRUNCATE before the reader holds its snapshot
        assert logs.ingest(from_peer(peer), allow_all) == 1  # frames in the WAL
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
    truncating.wait()  # the idle checkpoint has met the reader

    released = ingest_with_guard(reader, lambda: logs.ingest(from_peer(peer), allow_all))
    assert not released  # it returned with the snapshot still held
    reader.execute("COMMIT")
    reader.close()
    count = store.checkpointer.truncates  # the reader gone, a later idle TRUNCATE empties it
    while wal_bytes(store.path):
        count += 1
        store.checkpointer.wait_truncated(count)
    assert store.tip(bytes(AUTHOR.public))[0] == 2
    store.close()
    peer.store.close()


def test_an_ingest_returns_while_the_writers_own_checkpoint_meets_a_reader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "WRITER_WAIT_MS", 3_600_000, raising=False)  # main's waits
    logs, peer = service(tmp_path, 2), service(tmp_path, 4)
    store = logs.store
    at_the_bound = threading.Event()

    def spy(db: sqlite3.Connection, lock: threading.Lock) -> bool:
        if threading.current_thread() is not threading.main_thread():
            at_the_bound.set()
        return real_restart(db, lock)

    real_restart = db_module.restart
    monkeypatch.setattr(db_module, "restart", spy)
    reader = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    assert logs.ingest(from_peer(peer), allow_all) == 1  # frames in the WAL
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
    store._wal_hard = 1  # noqa: SLF001 - from now on every commit is past the hard bound
    me = signer(2)

    def local_write() -> None:  # the group commit's writer thread, at the hard bound
        seq, hash = store.tip(bytes(me.public))
        store.commit_batch(compose_batch(me, seq, hash, 0, WALL_MS + seq,
                                         [Write("s", "local", PUT, b"y")]), durable=True)

    writer = threading.Thread(target=local_write)
    writer.start()
    at_the_bound.wait()  # its RESTART has met the reader (main: waits for it, holding the lock)
    released = ingest_with_guard(reader, lambda: logs.ingest(from_peer(peer), allow_all))
    writer.join()
    assert not released  # it returned with the snapshot still held
    assert store.self_checkpoints == 0  # no RESTART could finish past the reader
    reader.execute("COMMIT")
    reader.close()
    assert logs.ingest(from_peer(peer), allow_all) == 1  # the reader gone: the next one restarts
    assert store.self_checkpoints == 1
    store.close()
    peer.store.close()
