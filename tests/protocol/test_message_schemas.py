"""Schemas at the boundary for what used to be parsed by hand: channel messages, relay
requests and answers, pairing payloads, discovery TXT records. Each bad input must give the
boundary's typed error naming the path to the bad value, never a value passed on."""

from __future__ import annotations

import msgpack
import pytest

from meshd.protocol.channel import decode_message
from meshd.protocol.schema import SchemaError


def packed(value: object) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


# ---- channel messages -----------------------------------------------------------------


@pytest.mark.parametrize(("message", "where"), [
    ({"t": "x" * 70_000}, "$['t']"),  # an oversized type name
    ({"t": ""}, "$['t']"),
    ({"t": "log.hello", "vector": nested(200)}, "$['vector']"),  # deep enough to recurse
])
def test_a_malformed_channel_message_is_a_schema_error_naming_the_path(
        message: dict[str, object], where: str) -> None:
    with pytest.raises(SchemaError) as caught:
        decode_message(packed(message))
    assert caught.value.where == where


def test_msgpack_extension_types_are_not_passed_on() -> None:
    # msgpack decodes ext type -1 as a Timestamp object and others as ExtType: values no
    # message field may hold, which a handler would meet where it expects an int or bytes.
    data = packed({"t": "log.hello", "at": msgpack.Timestamp(1, 0)})
    with pytest.raises(SchemaError):
        decode_message(data)


def test_a_wrong_typed_type_field_is_a_schema_error() -> None:
    with pytest.raises(SchemaError) as caught:
        decode_message(packed({"t": b"log.hello"}))
    assert caught.value.where == "$['t']"
    with pytest.raises(SchemaError) as caught:
        decode_message(packed([1, 2]))
    assert caught.value.where == "$"


def test_a_well_formed_message_with_unknown_fields_passes() -> None:
    message = {"t": "log.entries", "entries": [b"x" * 10] * 1000, "future": {"a": [1, 2]}}
    assert decode_message(packed(message)) == message


@pytest.mark.parametrize("value", [
    {"t": "log.hello", "d": b"x" * 100, "n": 5, "ok": True, "none": None, "f": 1.5},
    {"t": "x" * 64},
    {"t": "x" * 65},
    {"t": "\u00e9" * 33},  # 33 characters, 66 bytes of UTF-8
    {"t": "\u00e9" * 32},
    {"t": "log.hello", b"bytes key": 1},
    {"t": "log.hello", 1: "an integer key"},
    {"t": "log.hello", "e": msgpack.ExtType(1, b"ab")},
    {"t": "log.hello", "when": msgpack.Timestamp(1, 0)},
    {"t": "log.hello", "list": [1, "two", b"3"]},
    {"d": b"no type"},
    {"t": None},
    {"t": "log.hello", "nested": {"a": [1, [2, [3]]]}},
    {"t": "log.hello", "deep": nested(17)},
    {"t": "log.entries", "author": bytes(32), "headers": [b"h" * 150] * 4,
     "bodies": [b"b" * 1000, None, b"", b"b"], "head": {"seq": 4, "hash": bytes(32), "sig": b"s"}},
    {"t": "log.entries", "headers": [], "head": {}, "bodies": ()},
    {"t": "log.entries", "headers": [b"h", [b"nested"]]},
    {"t": "log.entries", "head": {"seq": {"nested": 1}}},
    {"t": "log.entries", "head": {"deep": nested(16)}},
    {"t": "log.entries", "headers": [nested(15)]},
    {"t": "log.entries", "e": [msgpack.ExtType(1, b"ab")]},
    {"t": "log.entries", "keys": {1: b"an integer key inside"}},
    {"t": "\u00e9" * 33, "headers": [b"h"]},
    {"headers": [b"h"], "head": {"seq": 1}},
    [b"not a map"],
    b"a string",
    7,
])
def test_the_common_message_fast_path_decides_as_the_schema_does(value: object) -> None:
    """decode_message skips the generic check for flat maps: it must accept and refuse
    exactly what unpack(data, MESSAGE) does, naming the same place."""
    from meshd.protocol.constants import MAX_MESSAGE_BYTES
    from meshd.protocol.messages import MESSAGE
    from meshd.protocol.schema import unpack

    data = packed(value)
    try:
        expected = unpack(data, MESSAGE, max_bytes=MAX_MESSAGE_BYTES)
    except SchemaError as refused:
        with pytest.raises(SchemaError) as caught:
            decode_message(data)
        assert (caught.value.where, caught.value.expected) == (refused.where, refused.expected)
        return
    assert decode_message(data) == expected
    assert decode_message(bytearray(data)) == expected
    assert decode_message(memoryview(data)) == expected


def test_a_log_entries_message_skips_the_generic_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A received push's containers hold only scalars (headers, bodies, head): decode_message
    accepts it without MESSAGE's walk (main: the generic check ran for every log.entries,
    ~4 us of a ~7 us decode)."""
    from meshd.protocol import messages

    checked: list[object] = []
    monkeypatch.setattr(messages.MESSAGE, "check", lambda value, where="$": checked.append(value))
    message = {"t": "log.entries", "author": bytes(32), "headers": [bytes(150)],
               "bodies": [bytes(1000)], "head": {"seq": 1, "hash": bytes(32), "sig": bytes(64)}}
    assert decode_message(packed(message)) == message
    assert checked == []
    decode_message(packed({"t": "log.entries", "headers": [[b"nested"]]}))
    assert len(checked) == 1  # deeper: MESSAGE decides


@pytest.mark.parametrize("data", [b"", b"\xc1", packed({"t": "x"}) + b"\x00", b"\x81\xa1t"])
def test_bytes_that_are_not_one_msgpack_value_are_refused_at_the_root(data: bytes) -> None:
    with pytest.raises(SchemaError) as caught:
        decode_message(data)
    assert caught.value.where == "$"


# ---- relay requests (relay side) --------------------------------------------------------

MAILBOX = bytes(32)


@pytest.mark.parametrize(("frame", "where"), [
    ({"t": "relay.deposit", "rid": 2**64, "mailbox": MAILBOX, "envelope": b"e"}, "$['rid']"),
    ({"t": "relay.deposit", "rid": 1, "mailbox": MAILBOX[:31], "envelope": b"e"}, "$['mailbox']"),
    ({"t": "relay.fetch", "rid": 1, "mailbox": MAILBOX, "after": True}, "$['after']"),
    ({"t": "relay.fetch", "rid": 1, "mailbox": MAILBOX, "after": 0, "limit": 1.5}, "$['limit']"),
    ({"t": "relay.subscribe", "rid": 1, "mailbox": MAILBOX, "after": 0, "notify": "yes"},
     "$['notify']"),
    ({"t": "relay.register", "rid": 1, "records": [b"r", 7]}, "$['records'][1]"),
    ({"t": "relay.register", "rid": 1, "records": [b"r"] * 4097}, "$['records']"),
    ({"t": "relay.segment_delete", "rid": 1, "ids": [bytes(16), bytes(15)]}, "$['ids'][1]"),
    ({"t": "relay.rendezvous", "rid": 1, "nameplate": 5, "role": b"offer"}, "$['role']"),
    ({"t": "relay.pipe", "data": b"x" * 65536}, "$['data']"),
    ({"t": "relay.ack", "rid": 1, "mailbox": MAILBOX, "upto": 0, "extra": nested(40)},
     "$['extra']"),
])
def test_a_malformed_relay_request_names_the_bad_field(frame: dict[str, object], where: str) -> None:
    from meshd.protocol.relay import MALFORMED, RelayError, parse_request

    with pytest.raises(RelayError) as caught:
        parse_request(frame)
    assert caught.value.code == MALFORMED
    assert where in caught.value.message
    assert isinstance(caught.value.__cause__, SchemaError)
    assert caught.value.__cause__.where == where


def test_an_oversized_envelope_is_too_large_not_malformed() -> None:
    from meshd.protocol.relay import MAX_ENVELOPE_BYTES, TOO_LARGE, RelayError, parse_request

    frame = {"t": "relay.deposit", "rid": 1, "mailbox": MAILBOX,
             "envelope": b"e" * (MAX_ENVELOPE_BYTES + 1)}
    with pytest.raises(RelayError) as caught:
        parse_request(frame)
    assert caught.value.code == TOO_LARGE


# ---- relay answers (device side: the relay is not trusted) ------------------------------


@pytest.mark.parametrize(("items", "where"), [
    ([[2**64 - 1, b"env"]], "$['items'][0][0]"),  # no SQLite integer holds it as a cursor
    ([[-1, b"env"]], "$['items'][0][0]"),
    ([[1, b"env", b"extra"]], "$['items'][0]"),
    ([[1, "env"]], "$['items'][0][1]"),
    ([[i, b"e"] for i in range(1025)], "$['items']"),
])
def test_a_relay_cannot_hand_a_device_bad_envelope_items(items: object, where: str) -> None:
    from meshd.protocol.relay import MALFORMED, RelayError, parse_envelopes

    with pytest.raises(RelayError) as caught:
        parse_envelopes({"t": "relay.envelopes", "rid": 1, "mailbox": MAILBOX, "items": items,
                         "more": False})
    assert caught.value.code == MALFORMED
    assert isinstance(caught.value.__cause__, SchemaError)
    assert caught.value.__cause__.where == where


@pytest.mark.parametrize("retry_after", [float("nan"), float("inf"), -5.0, 1e12, True, "1"])
def test_a_relay_error_cannot_park_or_spin_a_device(retry_after: object) -> None:
    """retry_after is what RelaySession sleeps before sending again: NaN or infinity would
    park it, a negative one would turn its patience into a busy loop."""
    from meshd.protocol.relay import MALFORMED, RelayError, parse_error

    with pytest.raises(RelayError) as caught:
        parse_error({"t": "relay.error", "rid": 1, "code": "rate-limited",
                     "retry_after": retry_after})
    assert caught.value.code == MALFORMED
    assert "$['retry_after']" in caught.value.message


def test_a_relay_error_parses_into_its_code() -> None:
    from meshd.protocol.relay import RelayError, parse_error

    error = parse_error({"t": "relay.error", "rid": 1, "code": "rate-limited",
                         "message": "slow down", "retry_after": 0.25})
    assert isinstance(error, RelayError)
    assert (error.code, error.message, error.retry_after) == ("rate-limited", "slow down", 0.25)


@pytest.mark.parametrize(("field", "value"), [
    ("quota", float("inf")),  # int(inf) raised OverflowError out of RelaySession.register
    ("used", -1), ("circle", bytes(31)), ("ttl", "30d"), ("incarnation", bytes(65)),
])
def test_a_malformed_registration_answer_is_malformed(field: str, value: object) -> None:
    from meshd.protocol.relay import MALFORMED, RelayError, check_answer

    answer = {"t": "relay.registered", "rid": 1, "circle": bytes(32), "quota": 1, "used": 0,
              "max_envelope": 1, "ttl": 1, "incarnation": bytes(16)}
    check_answer(answer)
    with pytest.raises(RelayError) as caught:
        check_answer({**answer, field: value})
    assert caught.value.code == MALFORMED
    assert f"$['{field}']" in caught.value.message


# ---- pairing ------------------------------------------------------------------------------

WELCOME = {"t": "pair.welcome", "records": [b"r"], "relays": ["127.0.0.1:1#AAAA"],
           "inviter": bytes(32), "port": 4000}


@pytest.mark.parametrize(("field", "value", "where"), [
    ("port", 70_000, "$['port']"),  # the joiner dialled it: no socket takes that port
    ("port", True, "$['port']"),
    ("relays", ["x"] * 100_000, "$['relays']"),  # one add_relay each
    ("relays", ["127.0.0.1:1", 5], "$['relays'][1]"),
    ("records", "not a list", "$['records']"),
    ("inviter", "alice", "$['inviter']"),
])
def test_a_malformed_welcome_names_the_bad_field(field: str, value: object, where: str) -> None:
    from meshd.protocol.pairing import MalformedPairingMessage, parse_reply

    assert parse_reply(dict(WELCOME)) == WELCOME
    with pytest.raises(MalformedPairingMessage) as caught:
        parse_reply({**WELCOME, field: value})
    assert isinstance(caught.value.__cause__, SchemaError)
    assert caught.value.__cause__.where == where


@pytest.mark.parametrize(("payload", "where"), [
    ([2**64 - 1, bytes(32)], "$[0]"),
    ([True, bytes(32)], "$[0]"),
    ([5, bytes(31)], "$[1]"),
])
def test_a_malformed_first_pairing_payload_names_the_bad_item(payload: object, where: str) -> None:
    from meshd.protocol.pairing import MalformedPairingMessage, decode_first_payload

    with pytest.raises(MalformedPairingMessage) as caught:
        decode_first_payload(packed(payload))
    assert isinstance(caught.value.__cause__, SchemaError)
    assert caught.value.__cause__.where == where


def test_a_pair_device_message_with_an_oversized_claim_names_it() -> None:
    from meshd.protocol.pairing import MalformedPairingMessage, parse_device_message

    with pytest.raises(MalformedPairingMessage) as caught:
        parse_device_message({"t": "pair.device", "claim": b"c" * 16385})
    assert isinstance(caught.value.__cause__, SchemaError)
    assert caught.value.__cause__.where == "$['claim']"


# ---- discovery TXT records ----------------------------------------------------------------


def test_a_txt_value_outside_base64_is_refused_not_silently_filtered() -> None:
    """base64 decoding alone drops characters outside its alphabet: "!" * 32 plus a valid
    nonce would have been read as that nonce."""
    import base64

    from meshd.protocol.discovery import parse_advert

    nonce = base64.urlsafe_b64encode(bytes(24)).decode().rstrip("=")
    hint = base64.urlsafe_b64encode(bytes(24)).decode().rstrip("=")
    assert parse_advert({b"v": b"1", b"n": nonce.encode(), b"h": hint.encode()}) == (bytes(24), bytes(24))
    with pytest.raises(SchemaError) as caught:
        parse_advert({b"v": b"1", b"n": ("!!!!" + nonce).encode(), b"h": hint.encode()})
    assert caught.value.where == "$['n']"


@pytest.mark.parametrize(("txt", "where"), [
    ({b"v": b"1", b"n": b"\xff"}, "$['n']"),
    ({b"v": b"1", 7: b"x"}, "$<key 1>"),
    ({f"k{i}".encode(): b"x" for i in range(100)}, "$"),
    ({b"v": b"2", b"n": b"AAAA", b"h": b"AAAA"}, "$['v']"),
])
def test_a_malformed_txt_record_names_the_bad_entry(txt: object, where: str) -> None:
    from meshd.protocol.discovery import parse_advert, recognise

    with pytest.raises(SchemaError) as caught:
        parse_advert(txt)
    assert caught.value.where == where
    assert recognise(txt, [bytes(32)], 5) is None
