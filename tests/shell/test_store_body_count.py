"""Store.body_count: what the backup asks to find segments whose bodies were purged."""

from __future__ import annotations

from pathlib import Path

from meshd.protocol.log import DELETE, PUT, Write
from meshd.store.db import Store

from .test_store import ME, write


def test_body_count_falls_when_a_delete_or_an_overwrite_purges(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    author = bytes(ME.public)
    write(store, [Write("s", f"r{i}", PUT, b"body") for i in range(10)])  # seqs 1..10
    assert store.body_count(author, 1, 10) == 10 and store.body_count(author, 3, 4) == 2
    write(store, [Write("s", "r3", DELETE)])  # seq 11 deletes r3 (seq 4)
    write(store, [Write("s", "r5", PUT, b"new")])  # seq 12 overwrites r5 (seq 6)
    assert store.body_count(author, 1, 10) == 8
    assert store.body_count(author, 4, 4) == 0 and store.body_count(author, 6, 6) == 0
    assert store.body_count(author, 11, 12) == 1  # a delete carries no body
    assert store.body_count(bytes(32), 1, 10) == 0  # an author this store never saw
    store.close()


def test_purges_counts_the_commits_that_purged_bodies_and_only_those(tmp_path: Path) -> None:
    """The backup checks segments' body counts only after a purge (Store.purges moved): a
    commit that purged nothing must not move it, every one that purged must."""
    store = Store(tmp_path / "m.db")
    assert store.purges == 0
    write(store, [Write("s", f"r{i}", PUT, b"body") for i in range(10)])
    write(store, [Write("s", "new", PUT, b"body")])
    assert store.purges == 0
    write(store, [Write("s", "r3", DELETE)])
    assert store.purges == 1
    write(store, [Write("s", "r5", PUT, b"new")])
    assert store.purges == 2
    write(store, [Write("s", "r5", PUT, b"newer"), Write("s", "r5", PUT, b"newest")])
    assert store.purges == 3
    store.purge()  # the WAL's purge resets purge_pending, never the count
    assert store.purges == 3 and not store.purge_pending
    store.close()
