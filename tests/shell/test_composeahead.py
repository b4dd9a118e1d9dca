"""composeahead: a large group of local writes is composed in parts by a helper thread while
the parts before are inserted, in one transaction (issue 16); the entries are those the
whole composed at once gives; a failure on either side commits nothing and leaves no thread."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from meshd.net import composeahead
from meshd.net.logsync import LogService
from meshd.protocol.log import CLEAR, DELETE, PUT, Header, PutRun, Write, compose_units
from meshd.store.db import StoreFull

from .test_logsync import WALL_MS, service

HOLD_LIMIT_S = 10.0  # only a guard against a hang: the test waits on events, never on time
PART = composeahead.PART_ENTRIES


def committed_entries(logs: LogService) -> int:
    with sqlite3.connect(logs.store.path) as db:
        return int(db.execute("SELECT count(*) FROM entries").fetchone()[0])


def units(count: int) -> list[Any]:
    return [[Write("a", "first", PUT, b"one")], PutRun("b", [b"%d" % i for i in range(count)])]


def test_a_large_group_is_the_entries_of_the_whole_with_a_head_at_each_part(tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    group = units(2 * PART + 10)  # three parts, the cut inside the PutRun
    whole = compose_units(logs._signer, 0, bytes(32), 0, WALL_MS, group, checked=True)
    batch = logs._compose_and_commit(group)
    assert (batch.first_seq, batch.headers, batch.record_ids, batch.orders, batch.last_hash) == (
        whole.first_seq, whole.headers, whole.record_ids, whole.orders, whole.last_hash)
    assert {PART, 2 * PART} <= {head.seq for head in batch.heads}  # each part ends signed
    assert batch.heads[-1].seq == len(whole) == batch.last_seq
    assert all(head.is_valid_for(logs.author) for head in batch.heads)
    assert committed_entries(logs) == len(whole) and logs.store.tip(logs.author)[0] == len(whole)
    stored = logs.read("b", limit=1000)["records"]
    assert [r["body"] for r in stored] == [b"%d" % i for i in range(1000)]
    assert Header.decode(batch.headers[-1]).seq == len(whole)


def test_the_next_part_is_composed_while_the_last_one_is_inserted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first part's insert waits until the second part is composed: composed in the
    writer thread after the insert, as before, it never would be (the guard fails it)."""
    logs = service(tmp_path, 1)
    second_composed = threading.Event()
    composers: list[threading.Thread] = []
    real_compose = composeahead.compose_units

    def compose_spy(*args: Any, **kwargs: Any) -> Any:
        batch = real_compose(*args, **kwargs)
        composers.append(threading.current_thread())
        if len(composers) == 2:
            second_composed.set()
        return batch
    monkeypatch.setattr(composeahead, "compose_units", compose_spy)
    waited: list[bool] = []

    def on_statement(statement: str) -> None:
        if statement.startswith("\nINSERT INTO bodies") and not waited:
            waited.append(second_composed.wait(HOLD_LIMIT_S))
    logs.store._db.set_trace_callback(on_statement)  # noqa: SLF001 - what SQLite executed
    logs._compose_and_commit(units(2 * PART))
    assert waited == [True]
    # The writer thread (here the main thread) composes the first part, the helper the rest.
    assert len(composers) == 3 and composers[0] is threading.main_thread()
    assert threading.main_thread() not in composers[1:]


def test_an_insert_that_fails_commits_nothing_and_ends_the_composer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = service(tmp_path, 1)
    real_insert = logs.store._insert_batch
    calls: list[int] = []

    def insert(batch: Any, touched: set[int]) -> bool:
        calls.append(len(batch))
        if len(calls) == 2:
            raise StoreFull("the disk is full")
        return real_insert(batch, touched)
    monkeypatch.setattr(logs.store, "_insert_batch", insert)
    with pytest.raises(StoreFull):
        logs._compose_and_commit(units(3 * PART))
    assert committed_entries(logs) == 0 and logs.store.tip(logs.author)[0] == 0
    assert not [t for t in threading.enumerate() if t.name == "meshd compose"]
    batch = logs._compose_and_commit(units(2 * PART))  # the next group starts from the tip
    assert batch.first_seq == 1 and committed_entries(logs) == 2 * PART + 1


def test_a_composer_that_fails_rolls_the_group_back_with_its_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = service(tmp_path, 1)
    real_compose = composeahead.compose_units
    calls: list[int] = []

    def compose(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in composing")
        return real_compose(*args, **kwargs)
    monkeypatch.setattr(composeahead, "compose_units", compose)
    with pytest.raises(RuntimeError, match="a bug in composing"):
        logs._compose_and_commit(units(2 * PART))
    assert committed_entries(logs) == 0 and logs.store.tip(logs.author)[0] == 0
    assert not [t for t in threading.enumerate() if t.name == "meshd compose"]


def test_a_small_group_is_composed_at_once_on_the_writer_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = service(tmp_path, 1)
    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        started.append(thread)
        real_start(thread)
    monkeypatch.setattr(threading.Thread, "start", start)
    batch = logs._compose_and_commit(units(2 * PART - 1))  # 2 * PART writes: parts
    assert len(batch) == 2 * PART and len(started) == 1
    started.clear()
    logs._compose_and_commit(units(2 * PART - 2))  # one write fewer: composed at once
    assert started == [] and committed_entries(logs) == 4 * PART - 1


def test_each_part_is_packed_in_the_composing_thread_into_the_rows_the_writer_would_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread's Python between its statements is the group's critical path: the
    columns of each part after the first (which it composes itself) are packed (bulk.spans:
    joins and JSON) by the helper that composed it, not by the writer thread, and the rows
    stored are those the writer's own packing gives."""
    from meshd.store import bulk

    from .test_store_bulk import contents
    (tmp_path / "ahead").mkdir()
    (tmp_path / "writer").mkdir()
    ahead, writer = service(tmp_path / "ahead", 1), service(tmp_path / "writer", 1)
    packers: list[threading.Thread] = []
    real_spans = bulk.spans

    def spans_spy(blobs: Any) -> Any:
        packers.append(threading.current_thread())
        return real_spans(blobs)
    with monkeypatch.context() as patch:
        patch.setattr(bulk, "spans", spans_spy)
        ahead._compose_and_commit(units(3 * PART + 7))
    assert len(packers) == 2 * 4  # headers and bodies of each of the four parts
    writer_thread = threading.current_thread()  # (the writer thread here)
    assert packers.count(writer_thread) == 2  # the first part's, as it inserts it
    # Then every kind of row, in parts after the first: empty bodies, an overwrite, deletes
    # (no body row), a NUL in a record id, a clear.
    mixed = [PutRun("b", [b"%d" % i for i in range(PART + 5)]),
             [Write("a", "first", PUT, b""), Write("a", "n\0ul", PUT, b"x"),
              Write("a", "first", DELETE), Write("b", "", CLEAR)],
             PutRun("b", [b"", b"y"] * 600), [Write("a", "n\0ul", PUT, b"again")]]
    ahead._compose_and_commit(mixed)
    with monkeypatch.context() as patch:
        patch.setattr(composeahead, "pack", lambda _batch: None)  # the writer packs each part
        writer._compose_and_commit(units(3 * PART + 7))
        writer._compose_and_commit(mixed)
    ahead.store.close()
    writer.store.close()
    got, want = contents(ahead.store.path), contents(writer.store.path)
    assert len(want["entries"]) == 3 * PART + 8 + PART + 5 + 4 + 1200 + 1
    assert any(row[2] == "n\0ul" for row in want["records"])  # (stream_id, its type, record_id, ...)
    assert got == want
