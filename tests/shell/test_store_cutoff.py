"""The store drops a removed member's entries past its removal point and rebuilds the view of
the streams they touched (protocol/logs.md, "A removed member's entries")."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from meshd.protocol.cutoff import NOTHING_COUNTS
from meshd.protocol.entry import Header, entry_hash, sign_head
from meshd.protocol.log import (
    CLEAR,
    DELETE,
    PUT,
    ZERO_HASH,
    Batch,
    Write,
    compose_batch,
    materialise,
    verify_batch,
)
from meshd.store.db import Store

from ..protocol.test_log import WALL_MS, allow_all, as_batch, signer
from .test_store import ME, write

THIEF = signer(66)
LATE = signer(67)  # a device that was offline, writing concurrently with the thief
HOUR_MS = 3_600_000


def receive(store: Store, who, writes: list[Write], wall_ms: int, **kw) -> None:
    author = bytes(who.public)
    seq, tip = store.tip(author)
    log = compose_batch(who, seq, tip, 0, wall_ms, writes, **kw)
    store.commit_batch(verify_batch(as_batch(log), seq, tip, allow_all), durable=False)


def texts(store: Store, stream: str) -> list[bytes]:
    return [body for _order, _id, body in store.read(stream, b"", 100)]


def the_view(store: Store):
    return materialise(Header.decode(h) for h in store.headers())


def stored_view(path: Path) -> dict[str, list[str]]:
    """The store's own materialised view (live records per stream, in order), read raw."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT s.name, r.record_id FROM records r JOIN streams s "
                          "ON s.id = r.stream_id WHERE r.live ORDER BY s.name, r.ord").fetchall()
    out: dict[str, list[str]] = {}
    for stream, record_id in rows:
        out.setdefault(stream, []).append(record_id)
    return out


def damaged_store(path: Path) -> tuple[Store, object]:
    """ME wrote m0, m1; the thief wrote t1 (counts), then, dated 10 h ahead, deleted m1, cleared
    the chat and put garbage (past its removal point), all in one batch with one head."""
    store = Store(path)
    write(store, [Write("chat", "m0", PUT, b"mine 0"), Write("chat", "m1", PUT, b"mine 1"),
                  Write("notes", "n", PUT, b"note")])
    thief = bytes(THIEF.public)
    before = compose_batch(THIEF, 0, ZERO_HASH, 0, WALL_MS + 10,
                           [Write("notes", "t1", PUT, b"thief before")])
    after = compose_batch(THIEF, 1, before.last_hash, before.max_hlc, WALL_MS + 10 * HOUR_MS,
                          [Write("chat", "m1", DELETE), Write("chat", "", CLEAR),
                           Write("chat", "g", PUT, b"garbage"), Write("spam", "s", PUT, b"spam")])
    # One batch, one head (at 5): the store holds no head at the cutoff's seq.
    batch = Batch(thief, before.headers + after.headers, before.bodies + after.bodies,
                  after.heads[-1])
    store.commit_batch(verify_batch(batch, 0, ZERO_HASH, allow_all), durable=False)
    cutoff = before.heads[-1]
    assert texts(store, "chat") == [b"garbage"] and store.tip(thief)[0] == 5
    return store, cutoff


def test_entries_past_the_cutoff_are_dropped_and_the_view_rebuilt(tmp_path: Path) -> None:
    store, cutoff = damaged_store(tmp_path / "m.db")
    thief = bytes(THIEF.public)
    assert store.cut_author(thief, cutoff)
    assert store.tip(thief) == (1, cutoff.hash)
    assert store.version_vector()[thief] == 1
    assert texts(store, "chat") == [] and texts(store, "spam") == []  # garbage gone
    assert texts(store, "notes") == [b"note", b"thief before"]  # before the cutoff: counts
    # The clear no longer hides anything: a write concurrent with it (dated before it, by a
    # device that had not seen it) shows, which the clear would have hidden.
    receive(store, LATE, [Write("chat", "late", PUT, b"late")], WALL_MS + 5 * HOUR_MS)
    assert texts(store, "chat") == [b"late"]
    # The store's view is the view of the entries that count.
    view = the_view(store)
    assert [r.record_id for r in view["chat"]] == ["m0", "m1", "late"]  # m0, m1: bodies purged
    assert stored_view(tmp_path / "m.db") == {
        stream: [r.record_id for r in records] for stream, records in view.items()}
    # What counts still syncs: a batch of the thief's log ends at the cutoff head.
    batch = store.batch_since(thief, 0, 1 << 20)
    assert batch is not None and batch["head"]["seq"] == 1 and batch["head"]["sig"] == cutoff.sig
    # Nothing to cut twice.
    assert not store.cut_author(thief, cutoff)
    store.close()
    reopened = Store(tmp_path / "m.db")
    assert reopened.tip(thief) == (1, cutoff.hash)
    assert texts(reopened, "chat") == [b"late"] and texts(reopened, "spam") == []
    reopened.close()


def test_a_deleted_record_without_its_body_is_counted_but_not_read(tmp_path: Path) -> None:
    store, cutoff = damaged_store(tmp_path / "m.db")
    store.cut_author(bytes(THIEF.public), cutoff)
    # The thief's delete of m1 no longer wins, but m1's body went when it was deleted
    # ("deleted means gone"): the view counts the record, a read cannot return it.
    assert [r.record_id for r in the_view(store)["chat"]] == ["m0", "m1"]
    assert texts(store, "chat") == []
    assert store.body_count(bytes(ME.public), 1, 3) == 1  # the note only


def test_a_zero_cutoff_drops_every_entry(tmp_path: Path) -> None:
    store, _cutoff = damaged_store(tmp_path / "m.db")
    thief = bytes(THIEF.public)
    assert store.cut_author(thief, NOTHING_COUNTS)
    assert store.tip(thief) == (0, ZERO_HASH)
    assert thief not in store.version_vector()
    assert store.batch_since(thief, 0, 1 << 20) is None
    assert texts(store, "notes") == [b"note"]


def test_a_cutoff_naming_another_entry_keeps_only_up_to_an_earlier_head(tmp_path: Path) -> None:
    store, cutoff = damaged_store(tmp_path / "m.db")
    thief = bytes(THIEF.public)
    forked = sign_head(THIEF, 3, entry_hash(b"another entry 3"))
    assert store.cut_author(thief, forked)
    # Our entry 3 is not the one the removal names (a fork): nothing we cannot tie to a
    # head we hold before it counts, and we hold none before entry 5.
    assert store.tip(thief) == (0, ZERO_HASH)
    del cutoff


def test_the_newest_head_before_a_time(tmp_path: Path) -> None:
    store, cutoff = damaged_store(tmp_path / "m.db")
    thief = bytes(THIEF.public)
    newest = store.newest_head(thief)
    assert newest is not None and newest.seq == 5
    assert store.newest_head(thief, before_ms=WALL_MS + HOUR_MS) is None  # no head at 1
    store.cut_author(thief, cutoff)  # (which stores the cutoff head)
    assert store.newest_head(thief, before_ms=WALL_MS + HOUR_MS) == cutoff
    assert store.newest_head(thief, before_ms=WALL_MS) is None
    assert store.newest_head(bytes(LATE.public)) is None
