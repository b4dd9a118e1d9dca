"""verify_batch checks a well-formed put's fields inline and leaves everything else to
check_header: for headers one field away from valid, at every boundary, it must reach the
same verdict as check_header (accept, or refuse for the same reason)."""

from __future__ import annotations

import msgpack
import pytest

from meshd.protocol.entry import (
    EMPTY_BODY_HASH,
    MAX_BODY_BYTES,
    MAX_HLC,
    MAX_SEQ,
    EntryRejected,
    check_header,
    entry_hash,
    sign_head,
)
from meshd.protocol.log import Batch, verify_batch

from .test_log import allow_all, signer

ME = signer(1)
AUTHOR = bytes(ME.public)
HASH = bytes(range(32))
#            author, seq, prev, hlc, stream, record id, op, body hash, body length
VALID = [AUTHOR, 1, bytes(32), 5, "s", "r", "put", HASH, 0]

CHANGES = [
    (3, -1), (3, MAX_HLC), (3, True), (3, 1.5),  # (MAX_HLC + 1 does not pack)
    (2, bytes(31)), (2, bytes(33)), (2, "x" * 32),
    (4, ""), (4, "s" * 64), (4, "s" * 65), (4, "é" * 64), (4, "é" * 128), (4, "é" * 129),
    (4, "🙂" * 64), (4, "🙂" * 65), (4, b"s"), (4, None),
    (5, ""), (5, "r" * 64), (5, "r" * 256), (5, "r" * 257), (5, "é" * 129), (5, 7),
    (6, "delete"), (6, "clear"), (6, "PUT"), (6, b"put"), (6, 0),
    (7, bytes(31)), (7, "h" * 32), (7, EMPTY_BODY_HASH),
    (8, -1), (8, MAX_BODY_BYTES), (8, MAX_BODY_BYTES + 1), (8, False), (8, 2.0),
]


def verdict(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except EntryRejected as err:
        return err.reason
    return "ok"


@pytest.mark.parametrize(("index", "value"), CHANGES)
def test_the_inline_checks_agree_with_check_header(index: int, value: object) -> None:
    fields = list(VALID)
    fields[index] = value
    header = msgpack.packb([1, *fields], use_bin_type=True)
    batch = Batch(AUTHOR, [header], [None], sign_head(ME, 1, entry_hash(header)))
    expected = verdict(lambda: check_header(*fields))
    assert verdict(lambda: verify_batch(batch, 0, bytes(32), allow_all)) == expected


def test_a_log_past_the_largest_seq_is_refused_as_check_header_does() -> None:
    fields = list(VALID)
    fields[1] = MAX_SEQ + 1
    header = msgpack.packb([1, *fields], use_bin_type=True)
    batch = Batch(AUTHOR, [header], [None], sign_head(ME, MAX_SEQ + 1, entry_hash(header)))
    assert verdict(lambda: check_header(*fields)) == "malformed"
    assert verdict(lambda: verify_batch(batch, MAX_SEQ, bytes(32), allow_all)) == "malformed"
