"""Declared shapes for untrusted values, checked before any other code touches them.

Every decoder of bytes from outside the process (a peer, a relay, a stranger) first turns
them into plain values (msgpack) and checks them against a schema declared beside the wire
spec it implements. A schema checks types exactly (`type(x) is bytes`, so bool is never an
int and a bytearray never bytes), sizes, counts, key sets and integer ranges, and raises
SchemaError naming where the value went wrong. It never sorts, hashes, compares or does
arithmetic on a value it has not yet checked, so a hostile value can only ever produce
SchemaError, whatever its shape.

    RECORD = Array(Tuple(Int(1, 1), Bin(max=32)), max_len=8)
    values = unpack(data, RECORD, max_bytes=1024)   # or RECORD.check(value)

Decoders translate SchemaError into their own typed error (RecordRejected("malformed"),
EntryRejected("malformed"), RelayError(MALFORMED), ...), all RemoteProtocolError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from .errors import RemoteProtocolError

# msgpack nests at most this deep in any message meshd reads (records are 3 levels deep).
MAX_DEPTH = 16


class SchemaError(RemoteProtocolError):
    """An untrusted value does not have its declared shape. `where` is a path like
    `$[0][5]["device"]`; the message never repeats the value itself."""

    reason = "malformed"

    def __init__(self, where: str, expected: str) -> None:
        super().__init__(f"{where}: expected {expected}")
        self.where = where
        self.expected = expected


class Schema:
    """Abstract: check(value) returns None or raises SchemaError."""

    def check(self, value: object, where: str = "$") -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def accepts(self, value: object) -> bool:
        """Whether check(value) passes; leaves override it with one expression, so an
        Array of them checks thousands of items without a call per item."""
        try:
            self.check(value)
        except SchemaError:
            return False
        return True


class Anything(Schema):
    """Anything that msgpack decodes (used only where a later layer has its own schema)."""

    def check(self, value: object, where: str = "$") -> None:
        _depth(value, where, MAX_DEPTH)


class Bin(Schema):
    def __init__(self, min_len: int = 0, max_len: int | None = None, *, exact: int | None = None) -> None:
        self.min_len = exact if exact is not None else min_len
        self.max_len = exact if exact is not None else max_len

    def check(self, value: object, where: str = "$") -> None:
        if not self.accepts(value):
            raise SchemaError(where, f"bytes of length {_range(self.min_len, self.max_len)}")

    def accepts(self, value: object) -> bool:
        return type(value) is bytes and self.min_len <= len(value) <= _bound(self.max_len)


class Text(Schema):
    """A str of min_bytes..max_bytes UTF-8 bytes (no lone surrogates: msgpack never makes them)."""

    def __init__(self, min_bytes: int = 0, max_bytes: int | None = None) -> None:
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes

    def check(self, value: object, where: str = "$") -> None:
        if type(value) is not str:
            raise SchemaError(where, "a string")
        # Each character is 1 to 4 bytes: skip the encoding when the length settles it.
        if self.max_bytes is not None and len(value) > self.max_bytes:
            raise SchemaError(where, f"a string of at most {self.max_bytes} bytes")
        try:
            size = len(value.encode())
        except UnicodeEncodeError as err:
            raise SchemaError(where, "valid Unicode") from err
        if not self.min_bytes <= size <= _bound(self.max_bytes):
            raise SchemaError(where, f"a string of {_range(self.min_bytes, self.max_bytes)} bytes")


class OneOf(Schema):
    """One of a fixed set of str/int constants (compared only once the type matches)."""

    def __init__(self, *choices: str | int) -> None:
        self.choices = frozenset(choices)
        self._types = frozenset(type(c) for c in choices)

    def check(self, value: object, where: str = "$") -> None:
        if type(value) not in self._types or value not in self.choices:
            raise SchemaError(where, f"one of {sorted(map(str, self.choices))}")


class Int(Schema):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def check(self, value: object, where: str = "$") -> None:
        if not self.accepts(value):
            raise SchemaError(where, f"an integer in {self.lo}..{self.hi}")

    def accepts(self, value: object) -> bool:
        return type(value) is int and self.lo <= value <= self.hi


class Float(Schema):
    """A finite number (msgpack float or int, never bool) in lo..hi: no NaN, no infinity."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def check(self, value: object, where: str = "$") -> None:
        if not self.accepts(value):
            raise SchemaError(where, f"a number in {self.lo:g}..{self.hi:g}")

    def accepts(self, value: object) -> bool:
        # NaN fails both comparisons; an int too large for a float compares exactly.
        return type(value) in (int, float) and self.lo <= value <= self.hi  # type: ignore[operator]


class Bool(Schema):
    def check(self, value: object, where: str = "$") -> None:
        if type(value) is not bool:
            raise SchemaError(where, "true or false")


class Nil(Schema):
    def check(self, value: object, where: str = "$") -> None:
        if value is not None:
            raise SchemaError(where, "nil")

    def accepts(self, value: object) -> bool:
        return value is None


class Either(Schema):
    """The first alternative that fits (alternatives should differ in type)."""

    def __init__(self, *alternatives: Schema) -> None:
        self.alternatives = alternatives

    def check(self, value: object, where: str = "$") -> None:
        if not self.accepts(value):
            raise SchemaError(where, "a value of another type")

    def accepts(self, value: object) -> bool:
        return any(alternative.accepts(value) for alternative in self.alternatives)


class Array(Schema):
    """A list (or tuple) of min_len..max_len items of one schema."""

    def __init__(self, item: Schema, min_len: int = 0, max_len: int | None = None) -> None:
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def check(self, value: object, where: str = "$") -> None:
        items = _sequence(value)
        if items is None or not self.min_len <= len(items) <= _bound(self.max_len):
            raise SchemaError(where, f"an array of {_range(self.min_len, self.max_len)} items")
        if _all_accepted(self.item, items):
            return  # the common case, fast; otherwise find and name the first bad item
        for index, item in enumerate(items):
            self.item.check(item, f"{where}[{index}]")


class Tuple(Schema):
    """A fixed-length array whose items each have their own schema."""

    def __init__(self, *items: Schema) -> None:
        self.items = items

    def check(self, value: object, where: str = "$") -> None:
        items = _sequence(value)
        if items is None or len(items) != len(self.items):
            raise SchemaError(where, f"an array of {len(self.items)} items")
        for index, (schema, item) in enumerate(zip(self.items, items, strict=True)):
            schema.check(item, f"{where}[{index}]")


class Map(Schema):
    """A map with str keys: exactly `fields` (plus any of `optional`); `sorted_keys` also
    requires the keys in sorted order (canonical encodings)."""

    def __init__(self, fields: Mapping[str, Schema], optional: Mapping[str, Schema] | None = None,
                 *, sorted_keys: bool = False, open_: bool = False) -> None:
        self.fields = dict(fields)
        self.optional = dict(optional or {})
        self.sorted_keys = sorted_keys
        self.open = open_  # unknown keys allowed (and left unchecked but depth-bounded)

    def check(self, value: object, where: str = "$") -> None:
        if self.accepts(value):
            return  # the common case, one pass; otherwise find and name what is wrong
        if type(value) is not dict:
            raise SchemaError(where, "a map")
        keys = list(value)
        if not all(type(key) is str for key in keys):
            raise SchemaError(where, "a map with string keys")
        if self.sorted_keys and keys != sorted(keys):
            raise SchemaError(where, "a map with sorted keys")
        missing = [key for key in self.fields if key not in value]
        if missing:
            raise SchemaError(where, f"a map with key {missing[0]!r}")
        for key in keys:
            schema = self.fields.get(key) or self.optional.get(key)
            if schema is None:
                if not self.open:
                    raise SchemaError(where, f"no key other than {sorted({*self.fields, *self.optional})}")
                _depth(value[key], f"{where}[{key[:32]!r}]", MAX_DEPTH)
                continue
            schema.check(value[key], f"{where}[{key!r}]")


    def accepts(self, value: object) -> bool:
        """check()'s verdict in one pass over the items, each field's by its accepts (no
        path strings built, no exception raised for a value that passes)."""
        if type(value) is not dict:
            return False
        fields, optional = self.fields, self.optional
        present = 0  # of the required fields
        for key, item in value.items():
            if type(key) is not str:
                return False
            schema = fields.get(key)
            if schema is not None:
                present += 1
            elif (schema := optional.get(key)) is None:
                if not self.open or not _shallow(item):
                    return False
                continue
            if not schema.accepts(item):
                return False
        if present != len(fields):
            return False
        return not self.sorted_keys or list(value) == sorted(value)


class MapOf(Schema):
    """A map of at most max_len entries, keys and values each of one schema."""

    def __init__(self, key: Schema, value: Schema, max_len: int) -> None:
        self.key, self.value, self.max_len = key, value, max_len

    def check(self, value: object, where: str = "$") -> None:
        if type(value) is not dict or len(value) > self.max_len:
            raise SchemaError(where, f"a map of at most {self.max_len} entries")
        for index, (key, item) in enumerate(value.items()):
            self.key.check(key, f"{where}<key {index}>")
            self.value.check(item, f"{where}<value {index}>")


def unpack(data: object, schema: Schema, *, max_bytes: int, use_list: bool = True) -> Any:
    """msgpack-decode untrusted bytes and check them against schema. Raises SchemaError.

    Only str and bytes map keys are decoded (msgpack's strict_map_key), extension types are
    refused, and sizes inside are bounded by max_bytes before allocation.
    """
    if type(data) not in (bytes, bytearray, memoryview):
        raise SchemaError("$", "bytes")
    if len(data) > max_bytes:  # type: ignore[arg-type]
        raise SchemaError("$", f"at most {max_bytes} bytes of msgpack")
    try:
        value = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=use_list,
            max_str_len=max_bytes, max_bin_len=max_bytes, max_array_len=max_bytes,
            max_map_len=max_bytes, max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as err:
        # ValueError covers msgpack's ExtraData, FormatError, StackError and bad UTF-8.
        raise SchemaError("$", "one msgpack value") from err
    schema.check(value)
    return value


_CONTAINERS = frozenset({list, tuple, dict})


def _depth(value: object, where: str, limit: int) -> None:
    """Bound the nesting of a value no schema describes in detail (an open map's extras).
    A container whose children hold no container (an array of 100,000 byte strings) is
    cleared at C speed, without a Python step per child."""
    stack: list[tuple[Any, int]] = [(value, limit)]
    while stack:
        item, left = stack.pop()
        if type(item) not in _CONTAINERS:
            continue
        if left <= 0:
            raise SchemaError(where, f"nesting of at most {limit} levels")
        children = item.values() if type(item) is dict else item
        if _CONTAINERS.isdisjoint(map(type, children)):
            continue
        stack.extend((child, left - 1) for child in children if type(child) in _CONTAINERS)


def _shallow(value: object) -> bool:
    """Whether _depth(value, ..., MAX_DEPTH) passes (an open map's extra field)."""
    if type(value) not in _CONTAINERS:
        return True
    try:
        _depth(value, "$", MAX_DEPTH)
    except SchemaError:
        return False
    return True


def _all_accepted(item: Schema, items: list[Any] | tuple[Any, ...]) -> bool:
    """Whether every item passes, at C speed for arrays of bytes (a batch's 100,000 headers):
    set(map(type, ...)) and min/max of the lengths instead of a Python call per item."""
    if isinstance(item, Bin):
        if not set(map(type, items)) <= {bytes}:
            return False
        if (item.min_len == 0 and item.max_len is None) or not items:
            return True
        lengths = list(map(len, items))
        return min(lengths) >= item.min_len and max(lengths) <= _bound(item.max_len)
    if isinstance(item, Either) and all(
        isinstance(a, Nil) or (isinstance(a, Bin) and a.min_len == 0 and a.max_len is None)
        for a in item.alternatives
    ):
        allowed = {bytes if isinstance(a, Bin) else type(None) for a in item.alternatives}
        return set(map(type, items)) <= allowed
    return all(map(item.accepts, items))


def _sequence(value: object) -> list[Any] | tuple[Any, ...] | None:
    """value as an array when it is exactly a list or tuple (no subclasses, no str)."""
    if type(value) is list or type(value) is tuple:
        return value
    return None


def _bound(limit: int | None) -> float:
    return float("inf") if limit is None else limit


def _range(lo: int, hi: int | None) -> str:
    if hi is None:
        return f"at least {lo}"
    return str(lo) if lo == hi else f"{lo}..{hi}"
