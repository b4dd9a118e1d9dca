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
