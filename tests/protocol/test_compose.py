"""compose_units and PutRun: a run of puts to one stream, composed without a Write per
entry, gives the very entries (bytes, ids, heads) that the same puts as Writes give, in any
mix of units; and a PutRun reads as those Writes."""

from __future__ import annotations

import pytest

from meshd.protocol.crypto import SigningKeyPair
from meshd.protocol.log import (
    CLEAR,
    DELETE,
    HEAD_EVERY_BYTES,
    PUT,
    ZERO_HASH,
    Header,
    InvalidRequest,
    PutRun,
    VerifiedBatch,
    Write,
    compose_batch,
    compose_units,
    joined,
    split_units,
)

WALL_MS = 1_700_000_000_000


def me() -> SigningKeyPair:
    return SigningKeyPair(bytes([7]) * 32)


def columns(batch: VerifiedBatch) -> tuple[object, ...]:
    return (batch.first_seq, batch.headers, batch.bodies, batch.streams, batch.record_ids,
            batch.ops, batch.orders, batch.heads, batch.last_hash, batch.max_hlc)


def as_writes(stream: str, bodies: list[bytes]) -> list[Write]:
    return [Write(stream, "", PUT, body) for body in bodies]


def test_a_put_run_composes_the_entries_its_writes_compose() -> None:
    bodies = [b"x" * n for n in (0, 1, 200, 5000)] * 60  # with an empty body, and heads
    tip = (5, bytes(range(32)), (WALL_MS + 3) << 16)
    run = compose_units(me(), *tip, WALL_MS, [PutRun("s", bodies)], head_every_bytes=64 * 1024)
    plain = compose_batch(me(), *tip, WALL_MS, as_writes("s", bodies), checked=True,
                          head_every_bytes=64 * 1024)
    assert columns(run) == columns(plain)
    assert len(run.heads) > 2 and run.heads[-1].seq == run.last_seq  # heads inside the run too
    assert {Header.decode(h).stream for h in run.headers} == {"s"}
    assert len(set(run.record_ids)) == len(bodies) and all(run.record_ids)


def test_units_mixed_with_put_runs_continue_one_chain_in_unit_order() -> None:
    first = [Write("a", "r1", PUT, b"one"), Write("a", "r1", DELETE)]
    last = [Write("c", "", CLEAR)]
    units = [first, PutRun("b", [b"p"] * 3), last, PutRun("b", [b"q"])]
    flat = [*first, *as_writes("b", [b"p"] * 3), *last, *as_writes("b", [b"q"])]
    mixed = compose_units(me(), 0, ZERO_HASH, 0, WALL_MS, units, checked=True)
    assert columns(mixed) == columns(compose_batch(me(), 0, ZERO_HASH, 0, WALL_MS, flat,
                                                   checked=True))
    assert mixed.streams == ["a", "a", "b", "b", "b", "c", "b"]
    assert [h.seq for h in mixed.heads] == [7]  # one head at the end (under HEAD_EVERY_BYTES)
    assert sum(map(len, mixed.headers)) < HEAD_EVERY_BYTES


def test_unchecked_units_are_checked_before_anything_is_composed_but_a_put_run_is_not() -> None:
    bad = [Write("s", "", PUT, b"x")]  # a plain Write needs its record id
    with pytest.raises(InvalidRequest, match="record id"):
        compose_units(me(), 0, ZERO_HASH, 0, WALL_MS, [PutRun("s", [b"ok"]), bad])
    composed = compose_units(me(), 0, ZERO_HASH, 0, WALL_MS, [PutRun("s", [b"ok"])])
    assert len(composed) == 1 and composed.record_ids[0]


def test_a_put_run_reads_as_its_writes() -> None:
    bodies = [b"a", b"", b"c"]
    run = PutRun("s", bodies)
    assert len(run) == 3 and run.bodies is bodies  # the caller's list, not a copy
    assert list(run) == as_writes("s", bodies) and run[1] == Write("s", "", PUT, b"")


def test_split_units_cuts_in_order_into_parts_of_at_most_the_size_given() -> None:
    writes = [Write("a", f"r{i}", PUT, b"w") for i in range(5)]
    run = PutRun("b", [b"%d" % i for i in range(7)])
    parts = split_units([writes, run, [Write("c", "", CLEAR)]], 4)
    assert [sum(map(len, part)) for part in parts] == [4, 4, 4, 1]
    assert [w for part in parts for unit in part for w in unit] == [*writes, *run, Write("c", "", CLEAR)]
    assert [type(unit) for unit in parts[1]] == [list, PutRun]  # a run's pieces are runs
    assert split_units([run], 7) == [[run]]  # a unit that fits is not copied


def test_parts_composed_one_after_the_other_and_joined_are_the_whole_plus_heads() -> None:
    units = [[Write("a", "x", PUT, b"1"), Write("a", "x", DELETE)], PutRun("b", [b"p"] * 9)]
    whole = compose_units(me(), 3, bytes(range(32)), 0, WALL_MS, units, checked=True)
    batches = []
    tip = (3, bytes(range(32)), 0)
    for part in split_units(units, 4):
        batches.append(compose_units(me(), *tip, WALL_MS, part, checked=True))
        tip = (batches[-1].last_seq, batches[-1].last_hash, batches[-1].max_hlc)
    parts = joined(batches)
    assert columns(parts)[:7] == columns(whole)[:7] and columns(parts)[8:] == columns(whole)[8:]
    assert [h.seq for h in parts.heads] == [7, 11, 14]


def test_order_keys_ids_and_hashes_are_those_of_the_entries_headers() -> None:
    """Both loops pack order keys in one struct call, format fresh ids and hash from copies
    of one BLAKE2b state: each must be entry.order_key, auto_record_id and BLAKE2b-256 of
    what the entry's header and body are."""
    from hashlib import blake2b

    from meshd.protocol.compose import auto_record_id
    from meshd.protocol.entry import EMPTY_BODY_HASH, order_key
    units = [PutRun("s", [b"a", b""]), [Write("t", "", PUT, b"b"), Write("t", "k", DELETE)]]
    batch = compose_units(me(), (1 << 16) - 2, ZERO_HASH, (WALL_MS + 9) << 16, WALL_MS, units,
                          checked=True)  # seqs across 2**16, an hlc past wall_ms
    prev = ZERO_HASH
    for header, body, order, record_id in zip(batch.headers, batch.bodies, batch.orders,
                                              batch.record_ids, strict=True):
        fields = Header.decode(header)
        assert order == order_key(fields.hlc, fields.author, fields.seq)
        assert record_id == fields.record_id
        # (the hashes come from copies of one empty BLAKE2b state: each is the plain one)
        assert fields.prev_hash == prev and (body is None or fields.body_hash == (
            blake2b(body, digest_size=32).digest() if body else EMPTY_BODY_HASH))
        prev = blake2b(header, digest_size=32).digest()
    assert prev == batch.last_hash
    author = bytes(me().public)
    hlcs = [Header.decode(h).hlc for h in batch.headers]
    assert batch.record_ids[:3] == [auto_record_id(hlc, author) for hlc in hlcs[:3]]
    assert batch.record_ids[3] == "k"
