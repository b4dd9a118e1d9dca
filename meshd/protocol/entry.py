"""Log entries: the header format, entry hashes, signed heads and the hybrid logical clock.

An entry is a canonical msgpack header (a 10-field array, protocol/logs.md "Entries") plus
an optional body that travels beside it; the header carries the body's hash. Entry n's
header names the hash of entry n-1's header, and an author signs *heads* (author, seq,
hash), each covering the whole prefix of its log. This module holds one entry's format and
checks; batches of entries, their verification and the view are log.py's.

Nothing here performs I/O or reads a clock: wall time comes in as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .crypto import SigningKeyPair, blake2b_256, signature_is_valid
from .errors import LocalProtocolError, RemoteProtocolError

# ---- Spec constants -----------------------------------------------------------------

ENTRY_VERSION = 1
HEAD_CONTEXT = b"meshd/log-head/1\x00"
HASH_BYTES = 32
KEY_BYTES = 32
SIGNATURE_BYTES = 64
ZERO_HASH = bytes(HASH_BYTES)
EMPTY_BODY_HASH = blake2b_256(b"")
MAX_BODY_BYTES = 1 << 20
MAX_NAME_BYTES = 256
# 10 fields with two 256-byte names and three 32-byte strings encode in under 700 bytes.
MAX_HEADER_BYTES = 1024
# Sequence numbers fit in 40 bits (the store packs (author, seq) into one integer key).
MAX_SEQ = (1 << 40) - 1
MAX_HLC = (1 << 64) - 1
HLC_COUNTER_BITS = 16

PUT, DELETE, CLEAR = 0, 1, 2
OP_NAMES = ("put", "delete", "clear")
OP_CODES = {name: code for code, name in enumerate(OP_NAMES)}

# ---- Implementation constants -------------------------------------------------------

# An HLC further ahead of the receiver's wall clock than this is refused ("clock-ahead"),
# and ignored when loaded at start-up: one entry from a broken or hostile clock can neither
# hide a stream's future (a clear or delete covers only entries ordered before it) nor drag
# every later local write past the 64-bit end of time (protocol/logs.md).
MAX_HLC_DRIFT_MS = 24 * 3600 * 1000


class EntryRejected(RemoteProtocolError):
    """A peer sent log entries that fail verification. `reason` is a stable short code:
    malformed, broken-chain, bad-signature, unknown-author, gap, oversized, bad-body, stalled,
    clock-ahead (an entry dated past the drift bound: the batch waits, the peer is not at fault).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class InvalidRequest(LocalProtocolError):
    """An app asked for something invalid: a write that cannot be an entry (too large,
    bad names) or a malformed read cursor."""


# ---- Headers and heads --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    author: bytes
    seq: int
    prev_hash: bytes
    hlc: int
    stream: str
    record_id: str
    op: str
    body_hash: bytes
    body_len: int

    def encode(self) -> bytes:
        return encode_header(
            self.author, self.seq, self.prev_hash, self.hlc, self.stream, self.record_id,
            self.op, self.body_hash, self.body_len,
        )

    @property
    def order(self) -> bytes:
        return order_key(self.hlc, self.author, self.seq)

    @classmethod
    def decode(cls, data: bytes) -> Header:
        """Parse and type-check one header. Raises EntryRejected('malformed'/'oversized')."""
        fields = unpack_header(data)
        header = cls(*fields[1:])
        check_header(header.author, header.seq, header.prev_hash, header.hlc, header.stream,
                      header.record_id, header.op, header.body_hash, header.body_len)
        return header


def encode_header(
    author: bytes, seq: int, prev_hash: bytes, hlc: int, stream: str, record_id: str,
    op: str, body_hash: bytes, body_len: int,
) -> bytes:
    packed: bytes = msgpack.packb(
        [ENTRY_VERSION, author, seq, prev_hash, hlc, stream, record_id, op, body_hash, body_len],
        use_bin_type=True,
    )
    return packed


def entry_hash(header: bytes) -> bytes:
    return blake2b_256(header)


def order_key(hlc: int, author: bytes, seq: int) -> bytes:
    """The view's total order as bytes: memcmp order equals (hlc, author, seq) order."""
    return hlc.to_bytes(8, "big") + author + seq.to_bytes(8, "big")


def head_signed_bytes(author: bytes, seq: int, hash: bytes) -> bytes:
    packed: bytes = msgpack.packb([author, seq, hash], use_bin_type=True)
    return HEAD_CONTEXT + packed


@dataclass(frozen=True, slots=True)
class Head:
    """The author's signature over (author, seq, hash of entry seq): covers entries 1..seq."""

    seq: int
    hash: bytes
    sig: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "sig": self.sig}

    def is_valid_for(self, author: bytes) -> bool:
        return signature_is_valid(author, head_signed_bytes(author, self.seq, self.hash), self.sig)


def sign_head(signer: SigningKeyPair, seq: int, hash: bytes) -> Head:
    return Head(seq, hash, signer.sign(head_signed_bytes(bytes(signer.public), seq, hash)))


# ---- Hybrid logical clock -----------------------------------------------------------


def next_hlc(last: int, wall_ms: int) -> int:
    """The next local timestamp: 48-bit milliseconds << 16 | a 16-bit counter, always
    greater than `last` (a counter overflow carries into the milliseconds)."""
    return max(last + 1, wall_ms << HLC_COUNTER_BITS)


def adoptable_hlc(seen: int, wall_ms: int) -> bool:
    """Whether a timestamp is within the drift bound of our wall clock (MAX_HLC_DRIFT_MS):
    a peer's may then be accepted, and a stored one may set our clock at start-up."""
    return seen <= hlc_limit(wall_ms)


def hlc_limit(wall_ms: int) -> int:
    """The largest hlc a receiver whose wall clock reads wall_ms accepts."""
    return min(MAX_HLC, ((max(0, wall_ms) + MAX_HLC_DRIFT_MS) << HLC_COUNTER_BITS) | 0xFFFF)


def hlc_millis(hlc: int) -> int:
    return hlc >> HLC_COUNTER_BITS


# ---- Checks of one header's fields --------------------------------------------------


def unpack_header(data: object) -> tuple[Any, ...]:
    if type(data) is not bytes:
        raise EntryRejected("malformed", "header is not bytes")
    if len(data) > MAX_HEADER_BYTES:
        raise EntryRejected("oversized", f"header of {len(data)} bytes")
    try:
        fields = msgpack.unpackb(data, use_list=False, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as err:
        raise EntryRejected("malformed", "header is not msgpack") from err
    if type(fields) is not tuple or len(fields) != 10 or fields[0] != ENTRY_VERSION:
        raise EntryRejected("malformed", "header is not a version-1 array of 10 fields")
    return fields


def check_name(name: object, what: str, *, empty: bool) -> None:
    if type(name) is not str:
        raise EntryRejected("malformed", f"{what} is not a string")
    if (len(name) > MAX_NAME_BYTES // 4 and len(name.encode()) > MAX_NAME_BYTES):
        raise EntryRejected("oversized", f"{what} longer than {MAX_NAME_BYTES} bytes")
    if bool(name) == empty:
        raise EntryRejected("malformed", f"{what} must {'' if empty else 'not '}be empty")


def check_header(
    author: object, seq: object, prev_hash: object, hlc: object, stream: object,
    record_id: object, op: object, body_hash: object, body_len: object,
) -> int:
    """Type and range checks of one header's fields; returns the op code."""
    if type(author) is not bytes or len(author) != KEY_BYTES:
        raise EntryRejected("malformed", "author is not a 32-byte key")
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise EntryRejected("malformed", "seq is not a sequence number")
    if type(prev_hash) is not bytes or len(prev_hash) != HASH_BYTES:
        raise EntryRejected("malformed", "prev_hash is not a 32-byte hash")
    if type(hlc) is not int or not 0 <= hlc <= MAX_HLC:
        raise EntryRejected("malformed", "hlc is not a 64-bit timestamp")
    code = OP_CODES.get(op) if type(op) is str else None
    if code is None:
        raise EntryRejected("malformed", "unknown op")
    if type(body_hash) is not bytes or len(body_hash) != HASH_BYTES:
        raise EntryRejected("malformed", "body hash is not 32 bytes")
    if type(body_len) is not int or body_len < 0:
        raise EntryRejected("malformed", "body length is not a size")
    if body_len > MAX_BODY_BYTES:
        raise EntryRejected("oversized", f"body of {body_len} bytes")
    check_name(stream, "stream", empty=False)
    check_name(record_id, "record id", empty=code == CLEAR)
    if code != PUT and (body_len or body_hash != EMPTY_BODY_HASH):
        raise EntryRejected("malformed", f"{op} carries a body")
    return code
