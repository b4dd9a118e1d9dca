"""Store.body_count: what the backup asks to find segments whose bodies were purged."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.protocol.log import CLEAR, DELETE, PUT, Write
from meshd.store import purgelog
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


def test_the_store_reports_which_entries_each_purging_commit_purged(tmp_path: Path) -> None:
    """The backup checks only the segments covering what a commit purged (issue 20): the store
    says which (author, seq range) each purging commit purged, whatever purged them."""
    store = Store(tmp_path / "m.db")
    author = bytes(ME.public)
    write(store, [Write("s", f"r{i}", PUT, b"body") for i in range(10)])  # r{i} is seq i + 1
    assert store.purged_since(0) == (0, [])
    write(store, [Write("s", "r3", DELETE)])  # seq 11 purges seq 4
    assert store.purged_since(0) == (1, [(author, 4, 4)])
    write(store, [Write("s", "r5", PUT, b"new"), Write("s", "r6", PUT, b"new")])  # seqs 6, 7
    write(store, [Write("s", "x", PUT, b"a"), Write("s", "x", PUT, b"b")])  # seq 14 loses at once
    assert store.purged_since(1) == (3, [(author, 6, 7), (author, 14, 14)])
    write(store, [Write("s", "", CLEAR)])  # seq 16: every body left in the stream
    count, runs = store.purged_since(3)
    assert count == 4 and runs is not None
    assert {seq for _, first, last in runs for seq in range(first, last + 1)} == \
        {1, 2, 3, 5, 8, 9, 10, 12, 13, 15}
    assert store.body_count(author, 1, 20) == 0
    store.close()


def test_the_journal_of_purges_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Older than the journal keeps: None (the backup then checks every segment)."""
    monkeypatch.setattr(purgelog, "MAX_RUNS", 2)
    store = Store(tmp_path / "m.db")
    write(store, [Write("s", f"r{i}", PUT, b"body") for i in range(10)])
    for i in (1, 3, 5):
        write(store, [Write("s", f"r{i}", DELETE)])
    assert store.purged_since(0) == (3, None)
    author = bytes(ME.public)
    assert store.purged_since(1) == (3, [(author, 4, 4), (author, 6, 6)])
    store.close()
