"""A store written by an older meshd, and what it must read back (the migration test's input).

`build(path)` writes a small store with every kind of content the schema holds: two
authors (one local, one received), puts, overwrites that supersede bodies, deletes, a
clear, several streams, several signed heads per log, circle records and state.
`snapshot(store)` is every read the API and the sync make of it, as JSON.

The fixture tests/shell/fixtures/store-v1.db (+ .json) was written with main's code at
schema version 1, before entries.record_id and entries.ord were dropped (schema 2):

    git archive <commit> | tar -x -C /tmp/base
    cd /tmp/base && PYTHONPATH=. python <worktree>/tests/shell/store_fixture.py <worktree>/tests/shell/fixtures/store-v1

Only APIs that schema version 1's code has are used here.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from meshd.protocol.crypto import SigningKeyPair
from meshd.protocol.log import CLEAR, DELETE, PUT, Write, compose_batch
from meshd.store.db import Store

WALL_MS = 1_700_000_000_000


def key(seed: int) -> SigningKeyPair:
    return SigningKeyPair(hashlib.sha256(b"store-fixture %d" % seed).digest())


LOCAL, PEER = key(1), key(2)


def _commit(store: Store, who: SigningKeyPair, writes: list[Write], wall_ms: int, *,
            durable: bool) -> None:
    seq, tip = store.tip(bytes(who.public))
    store.commit_batch(compose_batch(who, seq, tip, 0, wall_ms, writes, head_every_bytes=2048),
                       durable=durable)


def _puts(stream: str, ids: range, tag: str, size: int = 40) -> list[Write]:
    return [Write(stream, f"r{i}", PUT, f"{tag}{i}".encode().ljust(size, b".")) for i in ids]


def build(path: Path) -> None:
    store = Store(path)
    at = WALL_MS
    _commit(store, LOCAL, _puts("notes", range(30), "n"), at, durable=True)
    _commit(store, LOCAL, _puts("notes", range(10), "n-again"), at + 1000, durable=True)
    _commit(store, LOCAL, [Write("notes", f"r{i}", DELETE, b"") for i in range(10, 15)],
            at + 2000, durable=True)
    _commit(store, LOCAL, _puts("chat", range(20), "c"), at + 3000, durable=True)
    _commit(store, LOCAL, [Write("chat", "", CLEAR, b"")], at + 4000, durable=True)
    _commit(store, LOCAL, _puts("chat", range(15, 20), "c-after"), at + 5000, durable=True)
    _commit(store, LOCAL, _puts("docs", range(10), "d", size=3000), at + 6000, durable=True)
    # A peer's log, received: later overwrites win, an older one loses, a delete.
    _commit(store, PEER, _puts("notes", range(20, 35), "p"), at + 7000, durable=False)
    _commit(store, PEER, _puts("notes", range(25, 27), "p-old"), at - 1000, durable=False)
    _commit(store, PEER, [Write("notes", "r1", DELETE, b"")], at + 8000, durable=False)
    _commit(store, PEER, _puts("docs", range(5), "pd"), at + 9000, durable=False)
    store.add_circle_records([b"circle record one", b"circle record two"])
    store.set_state("cursor", b"\x01\x02\x03")
    store.purge()
    store.close()
    db = sqlite3.connect(path)
    db.execute("VACUUM")
    db.close()


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"hex": bytes(value).hex()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def snapshot(store: Store) -> Any:
    """Every read of the store the API and the sync make, as JSON-able data."""
    authors: dict[str, Any] = {}
    for who in (LOCAL, PEER):
        author = bytes(who.public)
        seq, _ = store.tip(author)
        messages = []
        after = 0
        while (message := store.batch_since(author, after, 4096)) is not None:
            messages.append(message)
            after = message["head"]["seq"]
        heads = [store.newest_head(author, before_ms=WALL_MS + ms)
                 for ms in (-5000, 0, 2500, 5500, 7500, 20000)]
        authors[author.hex()] = {
            "tip": store.tip(author),
            "last_header": store.last_header(author),
            "batches": messages,
            "newest_head": _head(store.newest_head(author)),
            "heads_before": [_head(h) for h in heads],
            "body_count": store.body_count(author, 1, seq),
        }
    return _plain({
        "version_vector": {a.hex(): s for a, s in sorted(store.version_vector().items())},
        "authors": authors,
        "streams": store.streams(),
        "reads": {name: store.read(name, b"", 1000) for name, _ in store.streams()},
        "paged": [store.read("notes", b"", 7),
                  store.read("notes", store.read("notes", b"", 7)[-1][0], 7)],
        "entry_count": store.entry_count(),
        "headers": list(store.headers()),
        "circle_records": store.circle_records(),
        "state": store.get_state("cursor"),
    })


def _head(head: Any) -> Any:
    return None if head is None else [head.seq, head.hash, head.sig]


def main() -> None:
    out = Path(sys.argv[1])
    db = out.with_suffix(".db")
    for leftover in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        leftover.unlink(missing_ok=True)
    build(db)
    store = Store(db)
    expected = snapshot(store)
    store.close()
    for leftover in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        leftover.unlink(missing_ok=True)
    out.with_suffix(".json").write_text(json.dumps(expected, indent=0, sort_keys=True) + "\n")
    version = sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0]
    print(f"{db}: schema version {version}, {expected['entry_count']} entries")


if __name__ == "__main__":
    main()
