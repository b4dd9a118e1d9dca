"""Relay frames: every request parses to one validated value or a RelayError with a code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.protocol.errors import RemoteProtocolError
from meshd.protocol.relay import (
    CONFLICT,
    ERROR_CODES,
    FATAL_CODES,
    MALFORMED,
    MAX_ENVELOPE_BYTES,
    MAX_FETCH_ITEMS,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    TOO_LARGE,
    UNAVAILABLE,
    UNKNOWN_TYPE,
    Ack,
    BackupGet,
    BackupPut,
    Deposit,
    Fetch,
    Limits,
    RecordsGet,
    Register,
    RelayError,
    Subscribe,
    TokenBucket,
    envelopes_frame,
    error_frame,
    parse_envelopes,
    parse_error,
    parse_request,
    request_id,
)

BOX = bytes(range(32))

VALID = [
    ({"t": "relay.register", "rid": 1, "records": [b"genesis", b"add"]},
     Register(1, (b"genesis", b"add"))),
    ({"t": "relay.deposit", "rid": 2, "mailbox": BOX, "envelope": b"sealed"},
     Deposit(2, BOX, b"sealed")),
    ({"t": "relay.fetch", "rid": 3, "mailbox": BOX, "after": 7},
     Fetch(3, BOX, 7, MAX_FETCH_ITEMS)),
    ({"t": "relay.fetch", "rid": 3, "mailbox": BOX, "after": 7, "limit": 10**6},
     Fetch(3, BOX, 7, MAX_FETCH_ITEMS)),
    ({"t": "relay.ack", "rid": 4, "mailbox": BOX, "upto": 9}, Ack(4, BOX, 9)),
    ({"t": "relay.subscribe", "rid": 5, "mailbox": BOX, "after": 0}, Subscribe(5, BOX, 0)),
    ({"t": "relay.register", "rid": 1, "records": []}, Register(1, ())),  # recovery
    ({"t": "relay.records", "rid": 6}, RecordsGet(6)),
    ({"t": "relay.backup_get", "rid": 6}, BackupGet(6)),
    ({"t": "relay.backup_put", "rid": 7, "expected_version": 0, "version": 1, "blob": b"b"},
     BackupPut(7, 0, 1, b"b")),
    # Unknown fields are ignored (forward compatibility).
    ({"t": "relay.backup_get", "rid": 8, "future": [1, 2]}, BackupGet(8)),
]


@pytest.mark.parametrize(("frame", "request_value"), VALID, ids=lambda v: str(v)[:40])
def test_valid_requests_parse(frame: dict[str, Any], request_value: object) -> None:
    assert parse_request(frame) == request_value


MALFORMED_FRAMES = [
    {"t": "relay.deposit", "mailbox": BOX, "envelope": b"x"},  # no rid
    {"t": "relay.deposit", "rid": -1, "mailbox": BOX, "envelope": b"x"},
    {"t": "relay.deposit", "rid": True, "mailbox": BOX, "envelope": b"x"},
    {"t": "relay.deposit", "rid": 1, "mailbox": BOX[:31], "envelope": b"x"},
    {"t": "relay.deposit", "rid": 1, "mailbox": "text", "envelope": b"x"},
    {"t": "relay.deposit", "rid": 1, "mailbox": BOX, "envelope": "text"},
    {"t": "relay.deposit", "rid": 1, "mailbox": BOX, "envelope": b""},  # empty: not too-large
    {"t": "relay.fetch", "rid": 1, "mailbox": BOX, "after": "0"},
    {"t": "relay.fetch", "rid": 1, "mailbox": BOX, "after": 2**64},
    {"t": "relay.ack", "rid": 1, "mailbox": BOX},
    {"t": "relay.register", "rid": 1, "records": [b"ok", "text"]},
    {"t": "relay.register", "rid": 1, "records": b"not a list"},
    {"t": "relay.register", "rid": 1, "records": [b""]},
    {"t": "relay.register", "rid": 1, "records": [bytes(65 * 1024)]},
    {"t": "relay.backup_put", "rid": 1, "expected_version": 3, "version": 3, "blob": b"b"},
    {"t": "relay.backup_put", "rid": 1, "expected_version": 0, "version": 1, "blob": b""},
    {"t": "relay.backup_put", "rid": 1, "expected_version": 0, "version": 1.5, "blob": b"b"},
]


@pytest.mark.parametrize("frame", MALFORMED_FRAMES, ids=lambda f: str(f)[:60])
def test_malformed_requests_are_refused_with_a_code(frame: dict[str, Any]) -> None:
    with pytest.raises(RelayError) as refused:
        parse_request(frame)
    assert refused.value.code == MALFORMED
    assert refused.value.fatal


def test_unknown_types_are_refused() -> None:
    for kind in ("relay.teleport", "log.entries"):
        with pytest.raises(RelayError) as refused:
            parse_request({"t": kind, "rid": 1})
        assert refused.value.code == UNKNOWN_TYPE


def test_an_envelope_over_the_wire_maximum_is_too_large_but_not_fatal() -> None:
    with pytest.raises(RelayError) as refused:
        parse_request({"t": "relay.deposit", "rid": 1, "mailbox": BOX,
                       "envelope": bytes(MAX_ENVELOPE_BYTES + 1)})
    assert refused.value.code == TOO_LARGE
    assert not refused.value.fatal


@given(st.dictionaries(st.sampled_from(["t", "rid", "mailbox", "envelope", "after", "upto",
                                        "records", "blob", "version", "expected_version"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.binary(max_size=40),
                                 st.text(max_size=20), st.lists(st.binary(max_size=4), max_size=3),
                                 st.sampled_from(["relay.deposit", "relay.fetch", "relay.ack",
                                                  "relay.register", "relay.backup_put"]))))
def test_any_input_parses_or_raises_a_relay_error(frame: dict[str, Any]) -> None:
    # h11's invariant: hostile input produces RemoteProtocolError and nothing else.
    try:
        parse_request(frame)
    except RelayError as err:
        assert isinstance(err, RemoteProtocolError)


def test_request_id_is_read_even_from_a_malformed_frame() -> None:
    assert request_id({"t": "relay.nonsense", "rid": 42}) == 42
    assert request_id({"t": "relay.nonsense", "rid": "42"}) is None
    assert request_id({"t": "relay.nonsense", "rid": False}) is None


def test_error_frames_round_trip() -> None:
    sent = error_frame(9, RelayError(RATE_LIMITED, "slow down", retry_after=0.25))
    wire = msgpack.unpackb(msgpack.packb(sent, use_bin_type=True), raw=False)
    assert wire == {"t": "relay.error", "rid": 9, "code": "rate-limited",
                    "message": "slow down", "retry_after": 0.25}
    received = parse_error(wire)
    assert (received.code, received.message, received.retry_after) == (RATE_LIMITED, "slow down", 0.25)
    assert not received.fatal


def test_envelopes_frames_round_trip_and_are_checked_on_the_device() -> None:
    frame = envelopes_frame(None, BOX, [(1, b"a"), (5, b"b")], True)
    wire = msgpack.unpackb(msgpack.packb(frame, use_bin_type=True), raw=False)
    parsed = parse_envelopes(wire)
    assert (parsed.rid, parsed.items, parsed.more) == (None, ((1, b"a"), (5, b"b")), True)
    for bad_items in ([[1]], [["1", b"a"]], [[1, "a"]], "x"):
        with pytest.raises(RelayError):
            parse_envelopes({**wire, "items": bad_items})


def test_limits_decide_size_and_quota() -> None:
    limits = Limits(quota_bytes=100, max_envelope_bytes=60, max_backup_bytes=80)
    limits.check_deposit(60, 40)
    with pytest.raises(RelayError, match=TOO_LARGE):
        limits.check_deposit(61, 0)
    with pytest.raises(RelayError, match=QUOTA_EXCEEDED):
        limits.check_deposit(50, 51)
    limits.check_backup(80, 90, replaced=70)  # replacing a backup frees its bytes first
    with pytest.raises(RelayError, match=QUOTA_EXCEEDED):
        limits.check_backup(80, 90, replaced=60)
    assert CONFLICT == "conflict"


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) > 0
    assert not bucket.full(0.5)
    assert bucket.full(10.0)


def test_a_request_costing_more_than_the_burst_takes_a_full_bucket() -> None:
    # A relay run with --burst below SEGMENT_LIST_COST still advertises relay.segment_list:
    # its pages must go ahead once the bucket is full, not be refused with a retry_after
    # that never comes true (the bucket never holds more than its burst).
    bucket = TokenBucket(rate=1.0, burst=10.0, now=0.0)
    assert bucket.take(0.0, 16.0) == 0.0  # full: the whole bucket
    assert bucket.take(0.0) == pytest.approx(1.0)  # empty after it
    wait = bucket.take(5.0, 16.0)
    assert wait == pytest.approx(5.0)  # the time until the bucket is full again
    assert bucket.take(5.0 + wait, 16.0) == 0.0


def test_rendezvous_and_pipe_frames_parse_and_are_checked() -> None:
    from meshd.protocol.relay import (
        MAX_PIPE_DATA_BYTES,
        PipeClose,
        PipeData,
        Rendezvous,
        pipe_close_frame,
        pipe_frame,
        rendezvous_ready_frame,
    )

    assert parse_request({"t": "relay.rendezvous", "rid": 1, "nameplate": 999, "role": "offer"}) \
        == Rendezvous(1, 999, "offer")
    assert parse_request({"t": "relay.rendezvous", "rid": 2, "nameplate": 1, "role": "join"}) \
        == Rendezvous(2, 1, "join")
    # Pipe frames are a stream: no rid, and none needed.
    assert parse_request(pipe_frame(b"x" * MAX_PIPE_DATA_BYTES)) == PipeData(b"x" * MAX_PIPE_DATA_BYTES)
    assert parse_request(pipe_close_frame()) == PipeClose()
    assert rendezvous_ready_frame(5) == {"t": "relay.rendezvous_ready", "rid": 5}
    for bad in (
        {"t": "relay.rendezvous", "rid": 1, "nameplate": 0, "role": "offer"},
        {"t": "relay.rendezvous", "rid": 1, "nameplate": 1000, "role": "offer"},
        {"t": "relay.rendezvous", "rid": 1, "nameplate": True, "role": "offer"},
        {"t": "relay.rendezvous", "rid": 1, "nameplate": "7", "role": "join"},
        {"t": "relay.rendezvous", "rid": 1, "nameplate": 7, "role": "watch"},
        {"t": "relay.rendezvous", "nameplate": 7, "role": "join"},  # no rid
        {"t": "relay.pipe", "data": b""},
        {"t": "relay.pipe", "data": "text"},
        {"t": "relay.pipe", "data": bytes(MAX_PIPE_DATA_BYTES + 1)},
    ):
        with pytest.raises(RelayError) as refused:
            parse_request(bad)
        assert refused.value.code == MALFORMED and refused.value.fatal


def test_the_spec_lists_every_error_code_the_relay_sends() -> None:
    """protocol/relay.md's error table and the codes in meshd/protocol/relay.py agree, with
    whether each closes the connection; `unavailable` is the device side's own (no relay
    sends it)."""
    spec = (Path(__file__).resolve().parents[2] / "protocol" / "relay.md").read_text()
    table = spec[spec.index("### Error codes"):]
    table = table[: table.index("\n\n", table.index("| code |"))]
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| (yes|no) \|", table, re.M))
    assert set(rows) == ERROR_CODES - {UNAVAILABLE}
    assert {code for code, fatal in rows.items() if fatal == "yes"} == FATAL_CODES
