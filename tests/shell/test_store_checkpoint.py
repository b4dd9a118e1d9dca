"""WAL checkpoints off the committing connection (meshd/store/checkpoint.py): COMMIT does not
checkpoint, the checkpointer thread does; the WAL stays under its hard bound under a sustained
write load even when the checkpointer falls behind; purge() and close() leave nothing in it."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from meshd.protocol.log import PUT, Write, compose_batch
from meshd.store import checkpoint
from meshd.store.checkpoint import wal_bytes
from meshd.store.db import Store

from ..protocol.test_log import WALL_MS, signer

ME = signer(1)
BODY = 3000
PER_COMMIT = 20  # about 60 KB, 15+ pages, per transaction
# The most one of these transactions adds to the WAL (its pages and the b-tree pages it touches).
TXN_BYTES = 512 * 1024
MIB = 1024 * 1024


def write_many(store: Store, commits: int, *, tag: bytes = b"") -> list[int]:
    """Commit `commits` transactions of PER_COMMIT fresh records; the WAL size after each."""
    sizes = []
    for _ in range(commits):
        seq, hash = store.tip(bytes(ME.public))
        writes = [Write("s", f"r{seq}-{i}", PUT, tag + os.urandom(BODY // 2).hex().encode())
                  for i in range(PER_COMMIT)]
        store.commit_batch(compose_batch(ME, seq, hash, 0, WALL_MS + seq, writes), durable=False)
        sizes.append(wal_bytes(store.path))
    return sizes


def test_the_committing_connection_does_not_checkpoint(tmp_path: Path) -> None:
    # Bounds far away: nobody is asked to checkpoint. SQLite's automatic checkpoint (1,000
    # pages) inside COMMIT would restart the log and keep the file near 4 MiB.
    store = Store(tmp_path / "m.db", wal_soft_bytes=1 << 40, wal_hard_bytes=1 << 40)
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # noqa: SLF001
    sizes = write_many(store, 200)
    assert sizes[-1] > 10 * MIB
    assert sizes == sorted(sizes)  # the log never restarted
    assert store.checkpointer.checkpoints == 0
    assert store.self_checkpoints == 0
    assert len(store.read("s", b"", 10_000)) == 200 * PER_COMMIT
    store.close()


def test_a_writer_whose_checkpointer_falls_behind_checkpoints_itself(tmp_path: Path) -> None:
    # The checkpointer is never asked (soft bound far away): the hard bound alone holds.
    store = Store(tmp_path / "m.db", wal_soft_bytes=1 << 40, wal_hard_bytes=2 * MIB)
    sizes = write_many(store, 200)  # over 12 MiB in all
    assert max(sizes) <= 2 * MIB + TXN_BYTES
    assert store.self_checkpoints > 0
    assert store.checkpointer.checkpoints == 0
    assert len(store.read("s", b"", 10_000)) == 200 * PER_COMMIT
    store.close()


def test_the_checkpointer_keeps_the_wal_bounded_under_sustained_writes(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db", wal_soft_bytes=MIB // 2, wal_hard_bytes=4 * MIB)
    sizes = write_many(store, 200)
    store.checkpointer.drain()
    assert max(sizes) <= 4 * MIB + TXN_BYTES
    assert store.checkpointer.checkpoints > 0
    assert store.checkpointer.error is None
    assert len(store.read("s", b"", 10_000)) == 200 * PER_COMMIT
    store.close()


def test_purge_and_close_leave_nothing_in_the_wal(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db", wal_soft_bytes=MIB // 2, wal_hard_bytes=4 * MIB)
    secret = b"SECRET-" + os.urandom(8).hex().encode()
    write_many(store, 40, tag=secret)  # the checkpointer is at work meanwhile
    store.purge()  # waits for a checkpoint under way rather than failing with "in use"
    assert wal_bytes(store.path) == 0
    write_many(store, 40, tag=secret)
    store.close()
    assert not Path(f"{store.path}-wal").exists()
    reopened = Store(tmp_path / "m.db")
    assert len(reopened.read("s", b"", 10_000)) == 80 * PER_COMMIT
    reopened.close()


def test_after_an_idle_spell_the_checkpointer_empties_the_wal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "IDLE_S", 0.0)  # idle as soon as a commit is done
    store = Store(tmp_path / "m.db")
    with store.write_lock:  # no idle TRUNCATE runs between reading the count and the commit
        before = store.checkpointer.truncates
        write_many(store, 1)
        assert wal_bytes(store.path) > 0
    store.checkpointer.wait_truncated(before + 1)  # one after the commit
    assert wal_bytes(store.path) == 0
    assert len(store.read("s", b"", 100)) == PER_COMMIT
    store.close()


def test_a_reader_holding_the_wal_does_not_fail_the_writer_at_the_hard_bound(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db", wal_soft_bytes=1 << 40, wal_hard_bytes=MIB // 2)
    write_many(store, 1)
    reader = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM entries").fetchone()  # a snapshot in the WAL
    sizes = write_many(store, 10)  # past the bound: the writer's RESTART gives up each time
    assert sizes[-1] > MIB // 2
    assert store.self_checkpoints == 0
    reader.execute("COMMIT")
    write_many(store, 1)  # the reader has gone: the writer's own checkpoint finishes
    assert store.self_checkpoints == 1
    assert len(store.read("s", b"", 10_000)) == 12 * PER_COMMIT
    store.close()
