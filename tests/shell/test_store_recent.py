"""batch_since serves a live push from the newest committed entries kept in memory
(meshd/store/recent.py): no SQLite read, the same bytes as a read of the store, and nothing a
purge or a cut removed; memory bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.protocol.entry import Head
from meshd.protocol.log import CLEAR, DELETE, PUT, Write, compose_batch, verify_batch
from meshd.protocol.messages import encode_message
from meshd.store import recent
from meshd.store.db import Store, StoreError

from ..protocol.test_log import WALL_MS, allow_all, as_batch, puts, signer
from .test_store import ME, write

PEER = signer(2)
AUTHOR = bytes(ME.public)


def receive(store: Store, who, writes: list[Write]) -> None:
    author = bytes(who.public)
    seq, tip = store.tip(author)
    log = compose_batch(who, seq, tip, 0, WALL_MS + 1000 + 10 * seq, writes)  # (wins over ME)
    store.commit_batch(verify_batch(as_batch(log), seq, tip, allow_all), durable=False)


def stored(path: Path, author: bytes, after: int, max_bytes: int) -> bytes | None:
    """What a read of the store gives: a store opened afresh holds nothing in memory."""
    other = Store(path)
    try:
        message = other.batch_since(author, after, max_bytes)
    finally:
        other.close()
    return None if message is None else encode_message(message)


def sent(store: Store, author: bytes, after: int, max_bytes: int) -> bytes | None:
    message = store.batch_since(author, after, max_bytes)
    return None if message is None else encode_message(message)


def sql_reads(store: Store) -> list[str]:
    statements: list[str] = []
    store._reader.set_trace_callback(statements.append)
    return statements


def test_a_live_push_reads_no_sqlite(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    write(store, puts(3))
    seen = sql_reads(store)
    for n in range(5):  # each write is pushed as it commits
        write(store, puts(2, prefix=f"{n}-"))
        message = store.batch_since(AUTHOR, 3 + 2 * n, 256 * 1024)
        assert message is not None and message["head"]["seq"] == 5 + 2 * n
    assert seen == []


@pytest.mark.parametrize("after", [0, 1, 3, 4, 7, 11, 12])
@pytest.mark.parametrize("max_bytes", [1, 700, 1 << 20])
def test_a_push_from_memory_is_the_stored_bytes(tmp_path: Path, after: int,
                                                max_bytes: int) -> None:
    store = Store(tmp_path / "m.db")
    write(store, puts(4, body=b"x" * 150))
    write(store, [Write("s", "e", PUT, b"")])  # an empty body is a body
    write(store, [Write("t", "r0", PUT, b"t0"), Write("t", "r1", PUT, b"t1" * 300)])
    write(store, puts(5, prefix="b-", body=b"y" * 90))
    write(store, [Write("u", f"u{i}", PUT, bytes([i]) * (i * 40)) for i in range(7)],)
    served = store.recent.served
    assert sent(store, AUTHOR, after, max_bytes) == stored(tmp_path / "m.db", AUTHOR, after,
                                                           max_bytes)
    assert store.recent.served == served + 1  # (from memory, not a fallback to SQLite)


def test_heads_inside_a_batch_cut_it_as_the_stored_read_does(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    seq, hash = store.tip(AUTHOR)
    store.commit_batch(compose_batch(ME, seq, hash, 0, WALL_MS, puts(40, body=b"z" * 100),
                                     head_every_bytes=600), durable=True)
    assert len(store.recent._tails[AUTHOR].head_seqs) > 5
    for after in (0, 3, 9, 25, 39):
        for max_bytes in (1, 500, 2000, 1 << 20):
            assert sent(store, AUTHOR, after, max_bytes) == stored(tmp_path / "m.db", AUTHOR,
                                                                   after, max_bytes)


def test_a_peers_received_entries_are_served_from_memory_too(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    receive(store, PEER, puts(3, prefix="p"))
    receive(store, PEER, puts(2, prefix="q"))
    seen = sql_reads(store)
    message = sent(store, bytes(PEER.public), 2, 1 << 20)
    assert seen == []
    assert message == stored(tmp_path / "m.db", bytes(PEER.public), 2, 1 << 20)


@pytest.mark.parametrize("purge", ["delete", "overwrite", "clear", "received overwrite"])
def test_a_commit_that_purges_bodies_is_never_served_from_before_it(tmp_path: Path,
                                                                   purge: str) -> None:
    store = Store(tmp_path / "m.db")
    write(store, puts(4, body=b"secret"))
    if purge == "delete":
        write(store, [Write("s", "r1", DELETE)])
    elif purge == "overwrite":
        write(store, [Write("s", "r1", PUT, b"new")])
    elif purge == "clear":
        write(store, [Write("s", "", CLEAR)])
    else:
        receive(store, PEER, [Write("s", "r1", PUT, b"theirs")])
    message = store.batch_since(AUTHOR, 0, 1 << 20)
    assert message is not None
    assert None in message["bodies"][:4]  # the purged body is not sent
    assert encode_message(message) == stored(tmp_path / "m.db", AUTHOR, 0, 1 << 20)


def test_a_cut_is_never_served_from_before_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    receive(store, PEER, puts(3, prefix="a"))
    receive(store, PEER, puts(3, prefix="b"))
    peer = bytes(PEER.public)
    assert sent(store, peer, 0, 1 << 20) is not None
    message = store.batch_since(peer, 0, 1)
    assert message is not None
    head = message["head"]
    assert store.cut_author(peer, Head(head["seq"], head["hash"], head["sig"]))
    message = store.batch_since(peer, 0, 1 << 20)
    assert message is not None and message["head"]["seq"] == 3
    assert encode_message(message) == stored(tmp_path / "m.db", peer, 0, 1 << 20)
    assert store.batch_since(peer, 3, 1 << 20) is None


def test_a_transaction_that_failed_adds_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    write(store, puts(2))
    gap = compose_batch(ME, 5, store.tip(AUTHOR)[1], 0, WALL_MS, puts(1, prefix="g"))
    with pytest.raises(StoreError):
        store.commit_batch(gap, durable=True)
    assert store.recent._tails[AUTHOR].next_seq == 3


def test_memory_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recent, "MAX_ENTRIES", 16)
    monkeypatch.setattr(recent, "MAX_BYTES", 4000)
    store = Store(tmp_path / "m.db")
    for n in range(30):
        write(store, puts(3, prefix=f"{n}-", body=b"b" * (n * 10)))
        tail = store.recent._tails[AUTHOR]
        assert len(tail.headers) <= 16 and tail.size <= 4000
        assert tail.size == sum(map(len, tail.headers)) + sum(map(len, filter(None, tail.bodies)))
    for n in range(recent.MAX_AUTHORS + 3):
        receive(store, signer(10 + n), puts(1, prefix=f"p{n}-"))
    assert len(store.recent._tails) == recent.MAX_AUTHORS
    # What memory no longer holds is read from SQLite, the same bytes.
    assert sent(store, AUTHOR, 0, 1 << 20) == stored(tmp_path / "m.db", AUTHOR, 0, 1 << 20)
    assert sent(store, AUTHOR, 85, 1 << 20) == stored(tmp_path / "m.db", AUTHOR, 85, 1 << 20)
