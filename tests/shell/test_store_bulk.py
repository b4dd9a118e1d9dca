"""Set-based inserts of a batch (meshd/store/bulk.py): every row is the one executemany
inserted, and a batch's insert is a few statements, not one step per row."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from meshd.protocol.log import CLEAR, DELETE, PUT, VerifiedBatch, Write, compose_batch
from meshd.store import bulk
from meshd.store import db as store_db
from meshd.store.db import Store
from meshd.store.schema import STREAM_DIGITS

from ..protocol.test_log import WALL_MS, signer

A, B = signer(1), signer(2)
TABLES = {"authors": "id", "streams": "id", "entries": "id", "bodies": "id", "heads": "id",
          "records": "stream_id, record_id"}


def executemany_rows(db: sqlite3.Connection, first: int, headers: Sequence[bytes],
                     bodies: Sequence[bytes | None], stream_digits: bytes, ops: bytes) -> None:
    """The inserts as they were before bulk.py: executemany, one step per row (reference)."""
    stream_ids = [int(stream_digits[i:i + STREAM_DIGITS])
                  for i in range(0, len(stream_digits), STREAM_DIGITS)]
    db.executemany("INSERT INTO bodies(id, body) VALUES (?, ?)",
                   [(first + i, body) for i, body in enumerate(bodies) if body is not None])
    db.executemany("INSERT INTO entries(id, header, stream_id, op) VALUES (?, ?, ?, ?)",
                   zip(range(first, first + len(headers)), headers, stream_ids, ops, strict=True))


def batches() -> list[tuple[VerifiedBatch, bool]]:
    """Batches of two authors with every kind of row: puts of many sizes (an empty body,
    a large one), overwrites, deletes, a clear, NUL and non-ASCII record ids, several
    streams, a put received without its body, several heads per batch."""
    out: list[tuple[VerifiedBatch, bool]] = []
    tips = {A: (0, b"\0" * 32), B: (0, b"\0" * 32)}

    def add(who: object, writes: list[Write], at: int, durable: bool,
            edit: Callable[[VerifiedBatch], None] | None = None) -> None:
        seq, tip = tips[who]  # type: ignore[index]
        batch = compose_batch(who, seq, tip, 0, WALL_MS + at, writes,  # type: ignore[arg-type]
                              head_every_bytes=4096)
        if edit is not None:
            edit(batch)
        tips[who] = (batch.last_seq, batch.last_hash)  # type: ignore[index]
        out.append((batch, durable))

    sizes = [0, 1, 200, 3000, 70_000, 17]
    add(A, [Write("notes", f"r{i}", PUT, bytes([i % 256]) * sizes[i % len(sizes)])
            for i in range(300)], 1, True)
    add(A, [Write("notes", f"r{i}", PUT, b"again %d" % i) for i in range(0, 300, 3)], 2, True)
    add(A, [Write("notes", f"r{i}", DELETE, b"") for i in range(1, 40, 2)], 3, True)
    add(A, [Write("chat", f"c\0{i}", PUT, b"x" * i) for i in range(50)]
        + [Write("chat", "é✓\0", PUT, b"y"), Write("docs", "d", PUT, b"z")], 4, True)
    add(A, [Write("chat", "", CLEAR, b"")] + [Write("chat", f"c\0{i}", PUT, b"n") for i in range(5)],
        5, True)
    add(A, [Write("empty", "e", PUT, b"")], 5, True)  # every body of the batch empty
    add(A, [Write("one", "x", PUT, b"1"), Write("one", "x", PUT, b"2"),
            Write("one", "y", PUT, b"3")], 6, True)  # one stream, a record twice
    add(B, [Write(f"s{i % 7}", f"r{i % 90}", PUT, b"b%d" % i) for i in range(1000)], -5, False)

    def drop_body(batch: VerifiedBatch) -> None:  # a put whose body the peer did not send
        batch.bodies[3] = None

    add(B, [Write("notes", f"r{i}", PUT, b"late %d" % i) for i in range(10)], 9, False, drop_body)
    add(B, [Write("notes", "r2", DELETE, b""), Write("notes", "", CLEAR, b""),
            Write("notes", "r7", PUT, b"after the clear")], 10, False)
    return out


def contents(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, with each value's SQLite type."""
    db = sqlite3.connect(path)
    out = {}
    for table, key in TABLES.items():
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        typed = ", ".join(f"{c}, typeof({c})" for c in columns)
        out[table] = db.execute(f"SELECT {typed} FROM {table} ORDER BY {key}").fetchall()
    db.close()
    return out


def fill(path: Path) -> None:
    store = Store(path)
    for batch, durable in batches():
        store.commit_batch(batch, durable=durable)
    store.close()


def test_every_row_is_the_one_executemany_inserted(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fill(tmp_path / "bulk.db")
    with monkeypatch.context() as patch:
        patch.setattr(store_db, "insert_rows", executemany_rows)
        fill(tmp_path / "executemany.db")
    got, want = contents(tmp_path / "bulk.db"), contents(tmp_path / "executemany.db")
    assert len(want["entries"]) == sum(len(batch) for batch, _ in batches())
    assert len(want["bodies"]) > 100 and len(want["records"]) > 100
    for table in TABLES:
        assert got[table] == want[table], table


def test_a_batch_larger_than_one_packed_column_is_inserted_in_parts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(store_db, "insert_rows", executemany_rows)
        fill(tmp_path / "executemany.db")
    with monkeypatch.context() as patch:
        patch.setattr(bulk, "MAX_PACKED_BYTES", 5000)
        fill(tmp_path / "parts.db")
    assert contents(tmp_path / "parts.db") == contents(tmp_path / "executemany.db")


def test_a_batch_commits_in_a_few_statements_not_one_per_row(tmp_path: Path) -> None:
    """executemany steps once per row, releasing and retaking the GIL each time (the
    verifier thread of the receive pipeline then delays every row): a batch's commit must
    run a number of statements that does not grow with its rows. (New records only: the
    trace also names the statement again each time the view's trigger fires, per overwrite.)"""
    store = Store(tmp_path / "m.db")
    steps: list[str] = []
    store._db.set_trace_callback(steps.append)
    try:
        for rows in (10, 1000):
            seq, tip = store.tip(bytes(A.public))
            batch = compose_batch(A, seq, tip, 0, WALL_MS + rows,
                                  [Write("s", f"{rows}.{i}", PUT, b"body") for i in range(rows)])
            steps.clear()
            store.commit_batch(batch, durable=False)
            assert len(steps) <= 12, [" ".join(s.split())[:40] for s in steps]
    finally:
        store._db.set_trace_callback(None)
        store.close()


def test_columns_of_different_lengths_are_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(":memory:")
    with pytest.raises(store_db.StoreError, match="differ in length"):
        bulk.insert_rows(db, 1, [b"h"], [b"b", b"c"], b"0" * STREAM_DIGITS, b"\0")
