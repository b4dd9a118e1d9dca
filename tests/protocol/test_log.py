"""Entries, chains, signed heads, batch verification and the view: one test per rule."""

from __future__ import annotations

import random

import msgpack
import pytest

from meshd.protocol.crypto import SigningKeyPair, blake2b_256
from meshd.protocol.log import (
    CLEAR,
    DELETE,
    EMPTY_BODY_HASH,
    HEAD_CONTEXT,
    HEAD_EVERY_BYTES,
    MAX_BODY_BYTES,
    PUT,
    ZERO_HASH,
    Batch,
    EntryRejected,
    Head,
    Header,
    InvalidRequest,
    VerifiedBatch,
    Write,
    adoptable_hlc,
    auto_record_id,
    batch_size,
    compose_batch,
    encode_header,
    entry_hash,
    head_signed_bytes,
    materialise,
    next_hlc,
    order_key,
    sign_head,
    verify_batch,
)

from .harness import seeded_rng

WALL_MS = 1_700_000_000_000


def signer(seed: int) -> SigningKeyPair:
    return SigningKeyPair(seeded_rng(seed)(32))


def allow_all(author: bytes) -> bool:
    return True


def puts(n: int, stream: str = "s", body: bytes = b"body", prefix: str = "r") -> list[Write]:
    return [Write(stream, f"{prefix}{i}", PUT, body + i.to_bytes(4, "big")) for i in range(n)]


def as_batch(verified: VerifiedBatch, start: int = 0, end: int | None = None) -> Batch:
    """The wire batch of entries [start, end) of a composed run (end must be at a head)."""
    end = len(verified) if end is None else end
    last_seq = verified.first_seq + end - 1
    head = next(h for h in verified.heads if h.seq == last_seq)
    return Batch(verified.author, verified.headers[start:end], verified.bodies[start:end], head)


class MemoryLog:
    """A replica that keeps logs in dicts: the reference the store is compared with."""

    def __init__(self) -> None:
        self.entries: dict[bytes, list[tuple[bytes, bytes | None]]] = {}
        self.hashes: dict[bytes, list[bytes]] = {}
        self.heads: dict[bytes, dict[int, Head]] = {}

    def tip(self, author: bytes) -> tuple[int, bytes]:
        hashes = self.hashes.get(author, [])
        return (len(hashes), hashes[-1]) if hashes else (0, ZERO_HASH)

    def vector(self) -> dict[bytes, int]:
        return {author: len(log) for author, log in self.entries.items() if log}

    def commit(self, verified: VerifiedBatch) -> None:
        if not len(verified):
            return
        assert self.tip(verified.author)[0] + 1 == verified.first_seq
        log = self.entries.setdefault(verified.author, [])
        hashes = self.hashes.setdefault(verified.author, [])
        for header, body in zip(verified.headers, verified.bodies, strict=True):
            log.append((header, body))
            hashes.append(entry_hash(header))
        self.heads.setdefault(verified.author, {}).update({h.seq: h for h in verified.heads})

    def batch_since(self, author: bytes, after: int, max_bytes: int) -> Batch | None:
        log = self.entries.get(author, [])
        if len(log) <= after:
            return None
        heads = self.heads[author]
        size, end = 0, after
        for seq in range(after + 1, len(log) + 1):
            header, body = log[seq - 1]
            size += len(header) + len(body or b"")
            if seq in heads:
                end = seq
                if size >= max_bytes:
                    break
        run = log[after:end]
        return Batch(author, [h for h, _ in run], [b for _, b in run], heads[end])

    def headers(self) -> list[Header]:
        return [Header.decode(h) for log in self.entries.values() for h, _ in log]


# ---- encoding --------------------------------------------------------------------------


def test_header_is_a_canonical_ten_field_array() -> None:
    author = bytes(range(32))
    header = encode_header(author, 1, ZERO_HASH, 5 << 16, "chat", "m1", "put",
                           blake2b_256(b"hi"), 2)
    assert msgpack.unpackb(header) == [1, author, 1, ZERO_HASH, 5 << 16, "chat", "m1", "put",
                                       blake2b_256(b"hi"), 2]
    # Golden bytes (protocol/logs.md): any change here changes every entry hash.
    assert header.hex() == (
        "9a01c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f01c420"
        + "00" * 32 + "ce00050000a463686174a26d31a3707574c420"
        + blake2b_256(b"hi").hex() + "02"
    )
    decoded = Header.decode(header)
    assert decoded.encode() == header
    assert decoded.order == order_key(5 << 16, author, 1)


def test_head_signature_is_domain_separated() -> None:
    me = signer(1)
    head = sign_head(me, 3, b"\x07" * 32)
    assert head_signed_bytes(bytes(me.public), 3, b"\x07" * 32).startswith(HEAD_CONTEXT)
    assert head.is_valid_for(bytes(me.public))
    assert not head.is_valid_for(bytes(signer(2).public))
    assert not Head(4, head.hash, head.sig).is_valid_for(bytes(me.public))
    # A signature over the bare fields (no context) is not a head signature.
    bare = me.sign(msgpack.packb([bytes(me.public), 3, b"\x07" * 32], use_bin_type=True))
    assert not Head(3, head.hash, bare).is_valid_for(bytes(me.public))


def test_order_key_sorts_like_the_tuple() -> None:
    rng = random.Random(0)
    keys = [(rng.randrange(1 << 40), rng.randbytes(32), rng.randrange(1, 1 << 30))
            for _ in range(200)]
    assert sorted(keys) == sorted(keys, key=lambda k: order_key(*k))


# ---- hybrid logical clock --------------------------------------------------------------


def test_hlc_is_wall_time_when_the_clock_moves_forward() -> None:
    assert next_hlc(0, WALL_MS) == WALL_MS << 16


def test_hlc_counts_within_a_millisecond_and_when_the_clock_goes_back() -> None:
    first = next_hlc(0, WALL_MS)
    assert next_hlc(first, WALL_MS) == first + 1
    assert next_hlc(first + 1, WALL_MS - 5000) == first + 2


def test_hlc_from_a_far_future_peer_is_not_adopted() -> None:
    assert adoptable_hlc((WALL_MS + 1000) << 16, WALL_MS)
    assert not adoptable_hlc((WALL_MS + 2 * 86_400_000) << 16, WALL_MS)


# ---- composing -------------------------------------------------------------------------


def test_composed_entries_form_a_chain_with_a_signed_head() -> None:
    me = signer(1)
    run = compose_batch(me, 0, ZERO_HASH, 0, WALL_MS, puts(3))
    headers = [Header.decode(h) for h in run.headers]
    assert [h.seq for h in headers] == [1, 2, 3]
    assert headers[0].prev_hash == ZERO_HASH
    assert headers[1].prev_hash == entry_hash(run.headers[0])
    assert headers[2].prev_hash == entry_hash(run.headers[1])
    assert [h.hlc for h in headers] == [WALL_MS << 16, (WALL_MS << 16) + 1, (WALL_MS << 16) + 2]
    assert [h.seq for h in run.heads] == [3]
    assert run.heads[0].hash == entry_hash(run.headers[-1]) == run.last_hash
    assert run.heads[0].is_valid_for(bytes(me.public))


def test_a_large_write_batch_gets_a_head_every_head_interval() -> None:
    body = bytes(10_000)
    count = 3 * HEAD_EVERY_BYTES // len(body)
    run = compose_batch(signer(1), 0, ZERO_HASH, 0, WALL_MS, puts(count, body=body))
    seqs = [h.seq for h in run.heads]
    assert len(seqs) >= 3 and seqs[-1] == count
    gaps = [b - a for a, b in zip([0, *seqs], seqs, strict=False)]
    assert max(gaps) * (len(body) + 200) <= HEAD_EVERY_BYTES + len(body) + 200


def test_a_checked_put_without_a_record_id_gets_a_fresh_time_ordered_one() -> None:
    me = signer(1)
    author = bytes(me.public)
    writes = [Write("s", "", PUT, b"a"), Write("s", "mine", PUT, b"b"), Write("s", "", PUT, b"c")]
    run = compose_batch(me, 0, ZERO_HASH, 0, WALL_MS, writes, checked=True)
    hlcs = [Header.decode(h).hlc for h in run.headers]
    assert run.record_ids == [auto_record_id(hlcs[0], author), "mine", auto_record_id(hlcs[2], author)]
    assert [Header.decode(h).record_id for h in run.headers] == run.record_ids
    assert len(set(run.record_ids)) == 3


def test_composed_headers_are_the_canonical_encoding_of_their_fields() -> None:
    me = signer(1)
    writes = [*puts(2), Write("s", "r0", DELETE), Write("s", "", CLEAR), Write("t", "x", PUT, b"")]
    run = compose_batch(me, 5, bytes(range(32)), (WALL_MS + 9) << 16, WALL_MS, writes)
    for raw, body, order in zip(run.headers, run.bodies, run.orders, strict=True):
        h = Header.decode(raw)
        assert encode_header(h.author, h.seq, h.prev_hash, h.hlc, h.stream, h.record_id, h.op,
                             h.body_hash, h.body_len) == raw
        assert h.body_hash == blake2b_256(body or b"") and order == h.order
    assert [Header.decode(h).op for h in run.headers] == ["put", "put", "delete", "clear", "put"]
    assert run.bodies[2:4] == [None, None] and run.bodies[4] == b""


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (Write("s", "r", PUT, bytes(MAX_BODY_BYTES + 1)), "larger"),
        (Write("", "r", PUT, b"x"), "stream"),
        (Write("s" * 257, "r", PUT, b"x"), "stream"),
        (Write("s", "é" * 129, PUT, b"x"), "record id"),
        (Write("s", "", PUT, b"x"), "record id"),
        (Write("s", "r", DELETE, b"x"), "no body"),
        (Write("s", "r", CLEAR, b""), "record id"),
    ],
)
def test_invalid_writes_are_refused_before_anything_is_signed(write: Write, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        compose_batch(signer(1), 0, ZERO_HASH, 0, WALL_MS, [write])


# ---- verification ----------------------------------------------------------------------


def test_a_valid_batch_verifies_into_columns() -> None:
    me = signer(1)
    run = compose_batch(me, 0, ZERO_HASH, 0, WALL_MS, puts(5))
    verified = verify_batch(as_batch(run), 0, ZERO_HASH, allow_all)
    assert verified.first_seq == 1 and verified.last_seq == 5
    assert verified.headers == run.headers and verified.bodies == run.bodies
    assert verified.orders == run.orders and verified.ops == [PUT] * 5
    assert verified.last_hash == run.last_hash and verified.max_hlc == run.max_hlc


def test_a_continuation_verifies_against_the_tip() -> None:
    me = signer(1)
    first = compose_batch(me, 0, ZERO_HASH, 0, WALL_MS, puts(2))
    second = compose_batch(me, 2, first.last_hash, first.max_hlc, WALL_MS, puts(2, prefix="q"))
    verified = verify_batch(as_batch(second), 2, first.last_hash, allow_all)
    assert verified.first_seq == 3 and len(verified) == 2


def test_an_overlap_is_skipped_when_it_matches_our_chain() -> None:
    me = signer(1)
    run = compose_batch(me, 0, ZERO_HASH, 0, WALL_MS, puts(5))
    tip_hash = entry_hash(run.headers[2])
    verified = verify_batch(as_batch(run), 3, tip_hash, allow_all)
    assert verified.first_seq == 4 and verified.headers == run.headers[3:]
    assert len(verify_batch(as_batch(run), 5, run.last_hash, allow_all)) == 0


def test_an_overlap_that_forks_our_chain_is_a_broken_chain() -> None:
    run = compose_batch(signer(1), 0, ZERO_HASH, 0, WALL_MS, puts(5))
    with pytest.raises(EntryRejected) as caught:
        verify_batch(as_batch(run), 3, b"\x01" * 32, allow_all)
    assert caught.value.reason == "broken-chain"


def test_a_broken_chain_is_rejected() -> None:
    me = signer(1)
    run = compose_batch(me, 0, ZERO_HASH, 0, WALL_MS, puts(3))
    fields = msgpack.unpackb(run.headers[1])
    fields[3] = b"\x09" * 32  # entry 2 names a different predecessor
    headers = [run.headers[0], msgpack.packb(fields, use_bin_type=True), run.headers[2]]
    # Re-sign so only the chain is wrong, not the head.
    fields3 = msgpack.unpackb(headers[2])
    fields3[3] = entry_hash(headers[1])
    headers[2] = msgpack.packb(fields3, use_bin_type=True)
    head = sign_head(me, 3, entry_hash(headers[2]))
    with pytest.raises(EntryRejected) as caught:
        verify_batch(Batch(run.author, headers, run.bodies, head), 0, ZERO_HASH, allow_all)
    assert caught.value.reason == "broken-chain"


def test_a_tampered_entry_no_longer_matches_the_signed_head() -> None:
    run = compose_batch(signer(1), 0, ZERO_HASH, 0, WALL_MS, puts(3))
    fields = msgpack.unpackb(run.headers[2])
    fields[4] += 1  # move the timestamp
    batch = as_batch(run)
    batch.headers[2] = msgpack.packb(fields, use_bin_type=True)
    with pytest.raises(EntryRejected) as caught:
        verify_batch(batch, 0, ZERO_HASH, allow_all)
    assert caught.value.reason == "broken-chain"


def test_a_bad_signature_is_rejected() -> None:
    run = compose_batch(signer(1), 0, ZERO_HASH, 0, WALL_MS, puts(3))
    forged = sign_head(signer(2), 3, run.last_hash)  # right hash, wrong key
    batch = Batch(run.author, run.headers, run.bodies, forged)
    with pytest.raises(EntryRejected) as caught:
        verify_batch(batch, 0, ZERO_HASH, allow_all)
    assert caught.value.reason == "bad-signature"


def test_an_author_outside_the_circle_is_rejected() -> None:
    run = compose_batch(signer(1), 0, ZERO_HASH, 0, WALL_MS, puts(1))
    with pytest.raises(EntryRejected) as caught:
        verify_batch(as_batch(run), 0, ZERO_HASH, lambda author: author != run.author)
    assert caught.value.reason == "unknown-author"


def test_a_sequence_gap_is_rejected() -> None:
    me = signer(1)
    first = compose_batch(me, 0, ZERO_HASH, 0, WALL_MS, puts(2))
    later = compose_batch(me, 2, first.last_hash, first.max_hlc, WALL_MS, puts(2, prefix="q"))
    with pytest.raises(EntryRejected) as caught:
        verify_batch(as_batch(later), 0, ZERO_HASH, allow_all)  # we lack 1..2
    assert caught.value.reason == "gap"


def test_a_head_that_does_not_end_the_batch_is_rejected() -> None:
    run = compose_batch(signer(1), 0, ZERO_HASH, 0, WALL_MS, puts(3))
    batch = Batch(run.author, run.headers[:2], run.bodies[:2], run.heads[0])
    with pytest.raises(EntryRejected) as caught:
        verify_batch(batch, 0, ZERO_HASH, allow_all)
    assert caught.value.reason == "malformed"


def _signed(me: SigningKeyPair, fields: list[object], body: bytes | None) -> Batch:
    header = msgpack.packb(fields, use_bin_type=True)
    return Batch(bytes(me.public), [header], [body], sign_head(me, 1, entry_hash(header)))


def test_an_oversized_body_is_rejected_even_when_signed() -> None:
    me = signer(1)
    body = bytes(MAX_BODY_BYTES + 1)
    fields = [1, bytes(me.public), 1, ZERO_HASH, 1, "s", "r", "put", blake2b_256(body), len(body)]
    for sent in (body, None):
        with pytest.raises(EntryRejected) as caught:
            verify_batch(_signed(me, fields, sent), 0, ZERO_HASH, allow_all)
        assert caught.value.reason == "oversized"


def test_an_oversized_record_id_is_rejected() -> None:
    me = signer(1)
    fields = [1, bytes(me.public), 1, ZERO_HASH, 1, "s", "r" * 300, "put", EMPTY_BODY_HASH, 0]
    with pytest.raises(EntryRejected) as caught:
        verify_batch(_signed(me, fields, b""), 0, ZERO_HASH, allow_all)
    assert caught.value.reason == "oversized"


def test_a_body_that_does_not_match_its_hash_is_rejected() -> None:
    run = compose_batch(signer(1), 0, ZERO_HASH, 0, WALL_MS, puts(2))
    batch = as_batch(run)
    batch.bodies[1] = b"something else"
    with pytest.raises(EntryRejected) as caught:
        verify_batch(batch, 0, ZERO_HASH, allow_all)
    assert caught.value.reason == "bad-body"


def test_a_withheld_body_is_accepted_and_stays_absent() -> None:
    run = compose_batch(signer(1), 0, ZERO_HASH, 0, WALL_MS, puts(2))
    batch = as_batch(run)
    batch.bodies[0] = None
    assert verify_batch(batch, 0, ZERO_HASH, allow_all).bodies == [None, run.bodies[1]]


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, 2),  # version
        (2, "1"),  # seq as a string
        (2, True),  # seq as a bool
        (3, 0),  # prev_hash as an int (logs.md: wrong field types are malformed)
        (3, "0" * 32),  # prev_hash as a string
        (3, ZERO_HASH[:16]),  # prev_hash too short
        (4, -1),  # negative timestamp
        (4, 1.5),  # float timestamp
        (5, b"s"),  # stream as bytes
        (5, ""),  # empty stream
        (6, 7),  # record id as an int
        (7, "merge"),  # unknown op
        (8, b"short"),  # body hash length
        (9, "4"),  # body length as a string
    ],
)
def test_wrong_types_in_a_signed_header_are_malformed(index: int, value: object) -> None:
    me = signer(1)
    fields: list[object] = [1, bytes(me.public), 1, ZERO_HASH, 1, "s", "r", "put",
                            blake2b_256(b"body"), 4]
    fields[index] = value
    with pytest.raises(EntryRejected) as caught:
        verify_batch(_signed(me, fields, None), 0, ZERO_HASH, allow_all)
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize("prev_hash", [0, "0" * 32, ZERO_HASH[:16], None])
def test_decoding_a_header_checks_prev_hash(prev_hash: object) -> None:
    me = signer(1)
    fields = [1, bytes(me.public), 1, prev_hash, 1, "s", "r", "put", blake2b_256(b"body"), 4]
    with pytest.raises(EntryRejected) as caught:
        Header.decode(msgpack.packb(fields))
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize(
    "header",
    [b"\xc1", msgpack.packb({"v": 1}), msgpack.packb([1, 2, 3]), "text"],
)
def test_a_header_that_is_not_a_header_is_malformed(header: object) -> None:
    me = signer(1)
    batch = Batch(bytes(me.public), [header], [None], sign_head(me, 1, ZERO_HASH))  # type: ignore[list-item]
    with pytest.raises(EntryRejected) as caught:
        verify_batch(batch, 0, ZERO_HASH, allow_all)
    assert caught.value.reason == "malformed"


def test_delete_and_clear_entries_carry_no_body() -> None:
    me = signer(1)
    fields = [1, bytes(me.public), 1, ZERO_HASH, 1, "s", "r", "delete", blake2b_256(b"x"), 1]
    with pytest.raises(EntryRejected, match="carries a body"):
        verify_batch(_signed(me, fields, b"x"), 0, ZERO_HASH, allow_all)


def _message(**changes: object) -> dict[str, object]:
    run = compose_batch(signer(1), 0, ZERO_HASH, 0, WALL_MS, puts(2))
    message = as_batch(run).to_message()
    message.update(changes)
    return message


@pytest.mark.parametrize(
    "changes",
    [
        {"author": "alice"},
        {"author": b"short"},
        {"headers": "h"},
        {"headers": []},
        {"bodies": [None]},
        {"head": [1, 2, 3]},
        {"head": {"seq": "2", "hash": bytes(32), "sig": bytes(64)}},
        {"head": {"seq": 2, "hash": bytes(31), "sig": bytes(64)}},
        {"head": {"seq": 2, "hash": bytes(32), "sig": "sig"}},
    ],
)
def test_wrong_msgpack_types_in_a_batch_message_are_malformed(changes: dict[str, object]) -> None:
    with pytest.raises(EntryRejected) as caught:
        Batch.from_message(_message(**changes))
    assert caught.value.reason == "malformed"


def test_a_batch_message_round_trips() -> None:
    message = _message()
    wire = msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False)
    batch = Batch.from_message(wire)
    assert batch.to_message() == message
    assert batch.size == batch_size(batch.headers, batch.bodies) > 0


# ---- the view --------------------------------------------------------------------------


def _header(author: bytes, seq: int, hlc: int, record_id: str, op: str = "put",
            stream: str = "s") -> Header:
    body_hash = blake2b_256(f"{record_id}{seq}".encode()) if op == "put" else EMPTY_BODY_HASH
    return Header(author, seq, ZERO_HASH, hlc, stream, record_id, op, body_hash, 0)


A, B = b"\x0a" * 32, b"\x0b" * 32


def test_view_lists_live_records_in_hlc_author_seq_order() -> None:
    entries = [_header(B, 1, 5, "x"), _header(A, 1, 5, "y"), _header(A, 2, 3, "z")]
    assert [r.record_id for r in materialise(entries)["s"]] == ["z", "y", "x"]


def test_view_last_writer_wins_by_hlc_then_author_then_seq() -> None:
    view = materialise([_header(A, 1, 9, "x"), _header(B, 1, 9, "x"), _header(A, 2, 1, "x")])
    assert [(r.author, r.seq) for r in view["s"]] == [(B, 1)]


def test_view_delete_is_a_tombstone_and_a_later_put_revives() -> None:
    put, delete = _header(A, 1, 1, "x"), _header(B, 1, 2, "x", "delete")
    assert materialise([put, delete]) == {}
    assert [r.seq for r in materialise([put, delete, _header(A, 2, 3, "x")])["s"]] == [2]
    # A put older than the delete stays deleted, whatever order it arrives in.
    assert materialise([delete, put]) == {}


def test_view_clear_hides_what_orders_before_it_and_keeps_what_after() -> None:
    entries = [_header(A, 1, 1, "x"), _header(A, 2, 5, "y"), _header(B, 1, 3, "", "clear"),
               _header(A, 3, 2, "z", stream="other")]
    view = materialise(entries)
    assert [r.record_id for r in view["s"]] == ["y"]
    assert [r.record_id for r in view["other"]] == ["z"]


def test_view_is_a_function_of_the_set_of_entries() -> None:
    rng = random.Random(1)
    entries = [
        _header(rng.choice([A, B]), seq, rng.randrange(20), f"r{rng.randrange(5)}",
                rng.choice(["put", "put", "delete", "clear"]) if seq % 3 else "put")
        for seq in range(1, 60)
    ]
    entries = [h if h.op != "clear" else _header(h.author, h.seq, h.hlc, "", "clear")
               for h in entries]
    expected = materialise(entries)
    for _ in range(20):
        rng.shuffle(entries)
        assert materialise(entries) == expected
