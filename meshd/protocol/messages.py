"""Application messages on a channel: one msgpack map with a string type "t".

The channel (channel.py) carries them; this module encodes what we send and checks what we
receive against the message envelope's schema (protocol/channel.md, "Messages") before any
subsystem looks at it: a map with string keys, a "t" of 1..64 bytes, no msgpack extension
types, nesting at most schema.MAX_DEPTH levels. Each subsystem then checks its own fields
against its own schema; unknown fields are left alone (forward compatibility).
"""

from __future__ import annotations

from typing import Any

import msgpack

from .constants import MAX_MESSAGE_BYTES
from .errors import LocalProtocolError, RemoteProtocolError
from .schema import Map, Text, unpack

MAX_TYPE_BYTES = 64
MESSAGE = Map({"t": Text(1, MAX_TYPE_BYTES)}, open_=True)

# decode_message's fast path has the same limits as schema.unpack(data, MESSAGE, ...) with one
# keyword only, max_ext_len=0 (nine keywords cost unpackb a microsecond to parse, more than
# the decoding): msgpack >= 1.0's defaults are the rest, raw=False, strict_map_key=True,
# use_list=True, and every max_*_len bounded by len(data), at most MAX_MESSAGE_BYTES here.
_BYTES_TYPES = (bytes, bytearray, memoryview)
# unpackb makes exact types (no subclasses): a set lookup of the type, not isinstance (issue 16).
_CONTAINERS = frozenset({list, tuple, dict})


class UnexpectedMessage(RemoteProtocolError):
    """A message the session does not take here: an unknown type, or asking faster than it reads."""

    reason = "unexpected-message"


# A msgpack Packer grows its buffer to fit the largest message it packed and never shrinks it:
# a channel that kept one for its life held 1-2x the largest message it ever sent (a 4 MiB
# fetch page, a manifest, a segment), one mmap'd chunk per connection for as long as the
# connection lasts (issue 20: the relay's RSS rose in steps of about 4 MB). A channel keeps its
# packer for reuse only after messages up to this size: it then holds at most about twice this.
KEEP_PACKER_BYTES = 64 * 1024


def new_packer() -> msgpack.Packer:
    """A reusable msgpack packer for encode_message (packb builds one per call, ~3x slower)."""
    return msgpack.Packer(use_bin_type=True, autoreset=True, buf_size=4096)


def encode_message(message: dict[str, Any], packer: msgpack.Packer | None = None) -> bytes:
    """msgpack of an application message. Raises LocalProtocolError if it is not one."""
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise LocalProtocolError("an application message is a dict with a string 't'")
    try:
        packed: bytes = (packer or new_packer()).pack(message)
    except (TypeError, ValueError, OverflowError) as err:
        raise LocalProtocolError(f"message {message['t']!r} cannot be encoded: {err}") from err
    if len(packed) > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"message {message['t']!r} is larger than {MAX_MESSAGE_BYTES} bytes")
    return packed


def decode_message(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The message in data, checked against MESSAGE. Raises SchemaError (a
    RemoteProtocolError) naming where it went wrong for anything else.

    The common message (a map of string keys, an ASCII type, containers only of scalars)
    passes a check of a few comparisons; anything else is checked by MESSAGE, and what fails
    to decode goes through schema.unpack, so errors are decided and named exactly as before.
    The generic check alone cost ~8 us a message, as much as decrypting it.
    """
    if type(data) in _BYTES_TYPES and len(data) <= MAX_MESSAGE_BYTES:
        try:
            value = msgpack.unpackb(data, max_ext_len=0)  # limits: see above
        except (ValueError, TypeError, msgpack.UnpackException, RecursionError):
            pass  # unpack below decodes it again and raises the SchemaError
        else:
            if not _plainly_a_message(value):
                MESSAGE.check(value)
            return value  # type: ignore[no-any-return]
    message: dict[str, Any] = unpack(data, MESSAGE, max_bytes=MAX_MESSAGE_BYTES)
    return message


def _plainly_a_message(value: object) -> bool:
    """True only for values MESSAGE certainly accepts; False means "let MESSAGE decide".
    For unpackb's output (a subclass of list or dict would pass the check of its type)."""
    if type(value) is not dict:
        return False
    kind = value.get("t")
    if type(kind) is not str or not 0 < len(kind) <= MAX_TYPE_BYTES or not kind.isascii():
        return False
    for key, item in value.items():
        if type(key) is not str:
            return False
        if type(item) in _CONTAINERS:
            # One level of containers of scalars (a log.entries' headers, bodies and head)
            # nests 2 deep, within MAX_DEPTH: checked at C speed, no Python per child.
            children = item.values() if type(item) is dict else item
            if not _CONTAINERS.isdisjoint(map(type, children)):
                return False
    return True
