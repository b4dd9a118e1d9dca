"""A store written by an older meshd opens, migrates and reads exactly as before.

The fixture (tests/shell/fixtures/store-v1.db and its .json) was written by main's code at
schema version 1; tests/shell/store_fixture.py says how to rebuild it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from meshd.protocol.crypto import blake2b_256
from meshd.protocol.entry import Head, sign_head
from meshd.protocol.log import DELETE, PUT, Header, Write, materialise
from meshd.store.db import SCHEMA_VERSION, Store

from .store_fixture import LOCAL, PEER, WALL_MS, _commit, snapshot

FIXTURES = Path(__file__).parent / "fixtures"


def old_store(tmp_path: Path) -> Path:
    path = tmp_path / "old.db"
    shutil.copyfile(FIXTURES / "store-v1.db", path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "ord" in [row[1] for row in db.execute("PRAGMA table_info(entries)")]
    return path


def view_of(store: Store) -> dict[str, list[tuple[str, bytes]]]:
    """The store's live records per stream, in order: (record id, body hash)."""
    return {name: [(record_id, blake2b_256(body)) for _, record_id, body in
                   store.read(name, b"", 10_000)]
            for name, count in store.streams() if count}


def reference_view(store: Store) -> dict[str, list[tuple[str, bytes]]]:
    return {stream: [(r.record_id, r.body_hash) for r in records] for stream, records in
            materialise(Header.decode(h) for h in store.headers()).items()}


def stored_winners(path: Path) -> dict[str, list[tuple[str, int]]]:
    """The store's view table itself (live winners per stream, in order: record id and the
    winning entry's seq); after a cut, records that win again have no body left to read."""
    out: dict[str, list[tuple[str, int]]] = {}
    with sqlite3.connect(path) as db:
        for stream, record_id, entry_id in db.execute(
                "SELECT s.name, r.record_id, r.entry_id FROM records r JOIN streams s "
                "ON s.id = r.stream_id WHERE r.live ORDER BY s.name, r.ord"):
            out.setdefault(stream, []).append((record_id, entry_id & ((1 << 40) - 1)))
    return out


def reference_winners(store: Store) -> dict[str, list[tuple[str, int]]]:
    return {stream: [(r.record_id, r.seq) for r in records] for stream, records in
            materialise(Header.decode(h) for h in store.headers()).items()}


def test_a_schema_1_store_migrates_and_every_read_is_unchanged(tmp_path: Path) -> None:
    path = old_store(tmp_path)
    store = Store(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [row[1] for row in db.execute("PRAGMA table_info(entries)")] == [
            "id", "header", "stream_id", "op"]
    expected = json.loads((FIXTURES / "store-v1.json").read_text())
    assert json.loads(json.dumps(snapshot(store))) == expected
    assert view_of(store) == reference_view(store)
    assert store.integrity_check() == "ok"
    store.close()
    reopened = Store(path)  # migrated once; opening again changes nothing
    assert json.loads(json.dumps(snapshot(reopened))) == expected


def test_a_migrated_store_takes_writes_and_cuts_like_a_new_one(tmp_path: Path) -> None:
    path = old_store(tmp_path)
    store = Store(path)
    local, peer = bytes(LOCAL.public), bytes(PEER.public)
    bodies_before = store.body_count(local, 1, store.tip(local)[0])
    # Overwrite two live records of the old data and delete a third: their old bodies go.
    _commit(store, LOCAL, [Write("notes", "r2", PUT, b"new r2"), Write("notes", "r3", PUT, b"x"),
                           Write("notes", "r4", DELETE, b"")], WALL_MS + 60_000, durable=True)
    assert store.body_count(local, 1, store.tip(local)[0]) == bodies_before - 3 + 2
    assert view_of(store) == reference_view(store)
    assert [b for _, r, b in store.read("notes", b"", 1000) if r == "r2"] == [b"new r2"]
    # A cut of the peer's old log rebuilds the view from the migrated entries' headers.
    headers = [Header.decode(h) for h in store.headers()]
    keep = next(h for h in headers if h.author == peer and h.seq == 15)
    cutoff: Head = sign_head(PEER, keep.seq, blake2b_256(keep.encode()))
    assert store.cut_author(peer, cutoff)
    assert store.tip(peer)[0] == 15
    assert stored_winners(path) == reference_winners(store)
    assert store.newest_head(peer) == cutoff
    assert store.integrity_check() == "ok"


def test_record_ids_of_any_text_reach_the_view_unchanged(tmp_path: Path) -> None:
    # The view's statements receive a batch's record ids as JSON (schema.BATCH).
    ids = ['quote"d', "back\\slash", "tab\there", "nul\x00byte", "é", "雪", "🙂 emoji",
           "\u2028", "[1,2]", "null", "-0"]
    store = Store(tmp_path / "m.db")
    _commit(store, LOCAL, [Write("s", record_id, PUT, record_id.encode() or b"-")
                           for record_id in ids], WALL_MS, durable=True)
    assert sorted(r for _, r, _ in store.read("s", b"", 100)) == sorted(ids)
    assert all(body == record_id.encode() for _, record_id, body in store.read("s", b"", 100))
    _commit(store, LOCAL, [Write("s", record_id, DELETE, b"") for record_id in ids[:5]],
            WALL_MS + 1, durable=True)
    assert sorted(r for _, r, _ in store.read("s", b"", 100)) == sorted(ids[5:])
    assert view_of(store) == reference_view(store)
