"""The schema layer: every wrong shape is a SchemaError, never another exception."""

from __future__ import annotations

import msgpack
import pytest

from meshd.protocol.errors import RemoteProtocolError
from meshd.protocol.records import DeviceInfo, Record, RecordRejected
from meshd.protocol.schema import (
    Array,
    Bin,
    Bool,
    Either,
    Int,
    Map,
    MapOf,
    Nil,
    OneOf,
    SchemaError,
    Text,
    Tuple,
    unpack,
)

SHAPE = Map({"k": OneOf("a", "b"), "n": Int(0, 10), "b": Bin(exact=2),
             "l": Array(Tuple(Text(1, 4), Bool()), max_len=2)}, sorted_keys=False)


@pytest.mark.parametrize("value", [
    None, 1, "x", b"x", [], {},
    {"k": "a", "n": 1, "b": b"12", "l": [], "extra": 1},
    {"k": "a", "n": 1, "b": b"12"},
    {"k": "c", "n": 1, "b": b"12", "l": []},
    {"k": 1, "n": 1, "b": b"12", "l": []},
    {"k": "a", "n": True, "b": b"12", "l": []},  # a bool is not an int
    {"k": "a", "n": 11, "b": b"12", "l": []},
    {"k": "a", "n": 1, "b": bytearray(b"12"), "l": []},
    {"k": "a", "n": 1, "b": b"12", "l": [["", True]]},
    {"k": "a", "n": 1, "b": b"12", "l": [["abcde", True]]},
    {"k": "a", "n": 1, "b": b"12", "l": [["\ud800", True]]},
    {"k": "a", "n": 1, "b": b"12", "l": [["a", True]] * 3},
    {"k": "a", "n": 1, "b": b"12", "l": [["a", 1]]},
    {"k": "a", "n": 1, "b": b"12", b"l": []},
    {1: 2, "k": "a"},
])
def test_wrong_shapes_are_schema_errors(value: object) -> None:
    with pytest.raises(SchemaError) as caught:
        SHAPE.check(value)
    assert isinstance(caught.value, RemoteProtocolError)
    assert caught.value.where.startswith("$")


def test_a_right_shape_passes() -> None:
    SHAPE.check({"k": "b", "n": 10, "b": b"12", "l": [["abcd", False]]})
    MapOf(Bin(exact=1), Int(0, 1), 2).check({b"a": 0, b"b": 1})


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"\x91", b"\x01\x02", msgpack.packb(msgpack.ExtType(1, b"x")),
    b"\x91" * 100_000 + b"\x00",  # nested far deeper than any message
    b"\xdd\xff\xff\xff\xff",  # claims 4 G items
    b"\xa1\xff",  # invalid UTF-8
])
def test_unpack_refuses_what_is_not_one_bounded_msgpack_value(data: bytes) -> None:
    with pytest.raises(SchemaError):
        unpack(data, Array(Int(0, 1)), max_bytes=1 << 20)


def test_unpack_refuses_oversized_input_before_decoding() -> None:
    with pytest.raises(SchemaError, match="at most 4 bytes"):
        unpack(msgpack.packb([1, 2, 3, 4, 5]), Array(Int(0, 9)), max_bytes=4)


KEY = bytes(range(32))


@pytest.mark.parametrize("body", [
    {"a": b"", b"b": b""},  # str and bin keys: sorting them raised TypeError (#12)
    {b"device": b"x"},
    {"device": {"nested": [1, 2]}},
    {"device": b"x", "nonce": b"y", "zzz": 1, "zzzz": 2},
    {"boxes": [[KEY, b"x" * 80]], "epoch": 2**64 - 1},
    {"boxes": [[KEY, 1], [b"", None]], "epoch": 1},
    {"boxes": "no", "epoch": 1},
    {"boxes": [[KEY, b"x" * 80], [1, b"x" * 80]], "epoch": 1},
])
@pytest.mark.parametrize("kind", ["genesis", "add", "remove", "epoch", "recovery"])
def test_hostile_record_bodies_are_rejected_not_crashes(kind: str, body: object) -> None:
    circle_id, parents = (b"", []) if kind == "genesis" else (KEY, [KEY])
    data = msgpack.packb([[1, circle_id, kind, parents, KEY, body], bytes(64)], use_bin_type=True)
    with pytest.raises(RecordRejected) as caught:
        Record.decode(data)
    assert caught.value.reason in {"malformed", "bad-body"}


@pytest.mark.parametrize("fields", [
    [1, KEY, KEY, {"a": 1}, False],
    [1, KEY, KEY, "x" * 65, False],
    [1, KEY, [KEY], "x", False],
    [True, KEY, KEY, "x", False],
    [1, KEY, KEY, "x", 0],
])
def test_hostile_claims_are_rejected_not_crashes(fields: list[object]) -> None:
    with pytest.raises(RecordRejected):
        DeviceInfo.verify_claim(msgpack.packb([fields, bytes(64)], use_bin_type=True))


@pytest.mark.parametrize(("schema", "items", "bad_index"), [
    (Array(Bin(exact=2)), [b"ab"] * 1000 + [b"abc"] + [b"ab"], 1000),
    (Array(Bin(exact=2)), [b"ab", bytearray(b"ab")], 1),
    (Array(Bin(1, 4)), [b"a", b""], 1),
    (Array(Bin()), [b"a", "a"], 1),
    (Array(Either(Nil(), Bin())), [None, b"", 0], 2),
    (Array(Either(Nil(), Bin())), [None, b"", False], 2),
    (Array(Int(0, 9)), [1, 2, True], 2),
])
def test_the_fast_path_for_long_arrays_finds_the_same_bad_item(schema: Array, items: list[object],
                                                               bad_index: int) -> None:
    with pytest.raises(SchemaError) as caught:
        schema.check(items)
    assert caught.value.where == f"$[{bad_index}]"
    schema.check([item for i, item in enumerate(items) if i != bad_index])


def nested_list(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


OPEN_SORTED = Map({"a": Int(0, 9), "c": Either(Nil(), Map({"x": Bin(exact=1)}))},
                  {"b": Array(Bin(), max_len=2)}, sorted_keys=True, open_=True)


@pytest.mark.parametrize("value", [
    {"a": 1, "c": None}, {"a": 1, "b": [b"x"], "c": {"x": b"y"}}, {"a": 1, "c": None, "z": [[1]]},
    {"a": 1, "c": None, "z": nested_list(16)}, {"a": 1, "c": None, "z": nested_list(17)},
    {"c": None, "a": 1}, {"a": 1}, {"a": 1, "c": {"x": b"yy"}}, {"a": 1, "c": {"x": b"y", "q": 1}},
    {"a": 1, "b": [b"x"] * 3, "c": None}, {"a": 1, "b": ["x"], "c": None}, {"a": True, "c": None},
    {"a": 1, "c": None, 2: 3}, {"a": 1, "c": None, b"z": 3}, [], None,
])
def test_a_map_accepts_exactly_what_its_check_passes(value: object) -> None:
    """Map.check first asks Map.accepts (one pass, no path strings): its verdict must be the
    check's (the slow path, which names the error, decides only what accepts refused)."""
    for schema in (OPEN_SORTED, SHAPE):
        try:
            schema.check(value)
        except SchemaError:
            assert not schema.accepts(value)
        else:
            assert schema.accepts(value)
        slow = Map(schema.fields, schema.optional, sorted_keys=schema.sorted_keys, open_=schema.open)
        slow.accepts = lambda _value: False  # type: ignore[method-assign]
        try:
            slow.check(value)
        except SchemaError:
            assert not schema.accepts(value)  # the slow path alone refuses it too
        else:
            assert schema.accepts(value)
