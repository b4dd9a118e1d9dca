"""composeahead across groups (issue 16): while a group's transaction commits, the helper
composes the first part of the unit queued next (a pipelined batch request, queued while
this one commits: api/httpserver.py), and the next group uses it only if it continues
exactly the tip and clock that part was composed from."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from meshd.net import composeahead
from meshd.net.logsync import LogService
from meshd.protocol.log import PutRun, compose_units
from meshd.store.groupcommit import _Unit

from .test_logsync import service

HOLD_LIMIT_S = 10.0  # only a guard against a hang: the test waits on events, never on time
PART = composeahead.PART_ENTRIES


def run(name: str, count: int) -> PutRun:
    return PutRun(name, [b"%s%d" % (name.encode(), i) for i in range(count)])


def queue_next(logs: LogService, unit: Any) -> None:
    """unit queued in the group commit, as a pipelined request's is while a group commits."""
    logs.group_commit._queue.append(_Unit(unit))  # noqa: SLF001


def stored_entries(logs: LogService) -> int:
    with sqlite3.connect(logs.store.path) as db:
        return int(db.execute("SELECT count(*) FROM entries").fetchone()[0])


def spy_compose(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[bytes, str]], threading.Event]:
    """(first body, thread name) of each part composed; an event set once one starts with b"n0"."""
    composed: list[tuple[bytes, str]] = []
    next_first = threading.Event()
    real = composeahead.compose_units

    def spy(*args: Any, **kwargs: Any) -> Any:
        batch = real(*args, **kwargs)
        first = args[5][0].bodies[0]
        composed.append((first, threading.current_thread().name))
        if first == b"n0":
            next_first.set()
        return batch
    monkeypatch.setattr(composeahead, "compose_units", spy)
    return composed, next_first


def test_the_next_units_first_part_is_composed_while_this_group_commits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = service(tmp_path, 1)
    this, following = run("t", 2 * PART), run("n", 2 * PART + 5)
    queue_next(logs, following)
    composed, next_first = spy_compose(monkeypatch)
    waited: list[bool] = []

    def on_statement(statement: str) -> None:
        if statement == "COMMIT":  # the writer is at its COMMIT: the next part comes meanwhile
            waited.append(next_first.wait(HOLD_LIMIT_S))
    logs.store._db.set_trace_callback(on_statement)  # noqa: SLF001 - what SQLite executed
    first = logs._compose_and_commit([this])
    assert waited == [True]
    assert logs._lookahead.made == 1  # noqa: SLF001
    part = logs._lookahead.part  # noqa: SLF001
    assert part is not None and part.after == (first.last_seq, first.last_hash, first.max_hlc)
    # The next group starts with that unit: its first part is not composed again, and the
    # entries are those of the whole unit composed at once from that tip and clock.
    logs.group_commit._queue.clear()  # noqa: SLF001 - (the group commit would take it now)
    before = len(composed)
    second = logs._compose_and_commit([following])
    assert logs._lookahead.used == 1  # noqa: SLF001
    assert [body for body, _ in composed[before:]] == [b"n%d" % PART, b"n%d" % (2 * PART)]
    whole = compose_units(logs._signer, first.last_seq, first.last_hash, first.max_hlc,  # noqa: SLF001
                          part.wall_ms, [following], checked=True)
    assert (second.first_seq, second.headers, second.record_ids, second.orders, second.last_hash) == (
        whole.first_seq, whole.headers, whole.record_ids, whole.orders, whole.last_hash)
    assert all(head.is_valid_for(logs.author) for head in second.heads)
    assert stored_entries(logs) == len(this) + len(following) == logs.store.tip(logs.author)[0]


def test_a_next_part_whose_tip_moved_is_composed_afresh(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = service(tmp_path, 2)
    following = run("n", 2 * PART)
    queue_next(logs, following)
    logs._compose_and_commit([run("t", 2 * PART)])
    logs.group_commit._queue.clear()  # noqa: SLF001
    assert logs._lookahead.part is not None  # noqa: SLF001
    logs.write_many_nowait([("x", None, b"moves the tip")])  # (not through the group commit)
    composed, _ = spy_compose(monkeypatch)
    batch = logs._compose_and_commit([following])
    assert logs._lookahead.used == 0 and composed[0][0] == b"n0"  # noqa: SLF001
    assert batch.first_seq == 2 * PART + 2 and batch.last_seq == logs.store.tip(logs.author)[0]
    assert stored_entries(logs) == 4 * PART + 1


def test_a_small_or_other_next_unit_is_not_composed_ahead(tmp_path: Path) -> None:
    logs = service(tmp_path, 3)
    queue_next(logs, run("n", 2 * PART - 1))
    logs._compose_and_commit([run("t", 2 * PART)])
    assert logs._lookahead.part is None and logs._lookahead.made == 0  # noqa: SLF001
    logs.group_commit._queue.clear()  # noqa: SLF001
    queue_next(logs, run("n", 2 * PART))
    logs._compose_and_commit([run("t", 2 * PART)])
    logs.group_commit._queue.clear()  # noqa: SLF001
    logs._compose_and_commit([run("o", 2 * PART)])  # (not the unit it was composed for)
    assert logs._lookahead.made == 1 and logs._lookahead.used == 0  # noqa: SLF001
    assert logs._lookahead.part is None  # noqa: SLF001 - (dropped, not kept for later)
