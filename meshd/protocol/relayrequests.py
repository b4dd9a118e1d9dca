"""What a device may ask a relay: the request frames, their schemas, parse_request().

Every request is checked against its declared schema (schema.py; the field table of
protocol/relay.md, "Frames") before the relay touches a field: exact types, byte sizes,
counts and integer ranges. Unknown fields are ignored (relay.md), and depth-bounded like
every message. A frame that does not fit is RelayError("malformed") naming the path to the
bad value; an unknown relay.* type is "unknown-type". Size caps that depend on the relay's
configuration (envelope, backup) are the relay's decision (relay.Limits); the parser
enforces only the wire maxima, refusing a larger envelope, backup or segment as too-large.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .relaycodes import (
    MAILBOX_ID_BYTES,
    MALFORMED,
    MAX_BACKUP_BYTES,
    MAX_ENVELOPE_BYTES,
    MAX_FETCH_ITEMS,
    MAX_LISTED,
    MAX_NAMEPLATE,
    MAX_PIPE_DATA_BYTES,
    MAX_RECORD_BYTES,
    MAX_RECORDS,
    MAX_RID,
    MAX_SEGMENT_BYTES,
    MAX_SEGMENT_IDS,
    MIN_NAMEPLATE,
    ROLE_JOIN,
    ROLE_OFFER,
    SEGMENT_ID_BYTES,
    SEGMENT_LIST_COST,
    TOO_LARGE,
    UNKNOWN_TYPE,
    RelayError,
    malformed,
)
from .schema import Array, Bin, Bool, Either, Int, Map, Nil, OneOf, Schema, SchemaError, Text

# ---- Requests (device -> relay) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    rid: int
    records: tuple[bytes, ...]
    # The relay's enrolment token (admission.py), for a new circle at a relay in token
    # mode; never shown.
    token: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Deposit:
    rid: int
    mailbox: bytes
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Fetch:
    rid: int
    mailbox: bytes
    after: int
    limit: int


@dataclass(frozen=True, slots=True)
class Ack:
    rid: int
    mailbox: bytes
    upto: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    rid: int
    mailbox: bytes
    after: int
    notify: bool = False  # push hints (no items) rather than the envelopes themselves


@dataclass(frozen=True, slots=True)
class RecordsGet:
    rid: int


@dataclass(frozen=True, slots=True)
class BackupGet:
    rid: int


@dataclass(frozen=True, slots=True)
class BackupPut:
    rid: int
    expected_version: int
    version: int
    blob: bytes


@dataclass(frozen=True, slots=True)
class SegmentPut:
    rid: int
    id: bytes
    blob: bytes


@dataclass(frozen=True, slots=True)
class SegmentGet:
    rid: int
    id: bytes


@dataclass(frozen=True, slots=True)
class SegmentDelete:
    rid: int
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class SegmentList:
    """The ids and sizes of the blobs this device key stored (and those of unknown owner),
    in id order after `after` (b"": from the start), at most `limit`; with `device`, those
    that X25519 key stored instead, listed only if the circle removed that device."""

    rid: int
    after: bytes
    limit: int
    device: bytes = b""


@dataclass(frozen=True, slots=True)
class Rendezvous:
    rid: int
    nameplate: int
    role: str  # ROLE_OFFER or ROLE_JOIN


@dataclass(frozen=True, slots=True)
class PipeData:
    """Bytes for the other end of this connection's rendezvous (no rid, no answer)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PipeClose:
    """Close this connection's rendezvous: withdraw its offer, or end its pipe."""


Request = (Register | Deposit | Fetch | Ack | Subscribe | RecordsGet | BackupGet | BackupPut
           | SegmentPut | SegmentGet | SegmentDelete | SegmentList | Rendezvous | PipeData | PipeClose)


# ---- Their schemas -------------------------------------------------------------------

TYPE = Text(1, 64)
RID = Int(0, MAX_RID)
COUNT = Int(0, MAX_RID)  # envelope ids, cursors, versions
MAILBOX = Bin(exact=MAILBOX_ID_BYTES)
SEGMENT_ID = Bin(exact=SEGMENT_ID_BYTES)
MAX_TOKEN_BYTES = 64  # an enrolment token (the relay makes 32-byte ones)
# The blobs' upper bounds are checked after the schema, as too-large rather than malformed.
BLOB = Bin(1)


def _request(fields: dict[str, Schema], optional: dict[str, Schema] | None = None, *,
             rid: bool = True) -> Map:
    return Map({"t": TYPE, **({"rid": RID} if rid else {}), **fields}, optional, open_=True)


REQUESTS: dict[str, Map] = {
    # No records: a device that has none yet (recovery) asks the relay to find the circle
    # its key is a member of.
    "relay.register": _request({"records": Array(Bin(1, MAX_RECORD_BYTES), max_len=MAX_RECORDS)},
                               {"token": Either(Bin(1, MAX_TOKEN_BYTES), Nil())}),
    "relay.deposit": _request({"mailbox": MAILBOX, "envelope": BLOB}),
    "relay.fetch": _request({"mailbox": MAILBOX, "after": COUNT},
                            {"limit": Either(COUNT, Nil())}),
    "relay.ack": _request({"mailbox": MAILBOX, "upto": COUNT}),
    "relay.subscribe": _request({"mailbox": MAILBOX, "after": COUNT},
                                {"notify": Either(Bool(), Nil())}),
    "relay.records": _request({}),
    "relay.backup_get": _request({}),
    "relay.backup_put": _request({"expected_version": COUNT, "version": COUNT, "blob": BLOB}),
    "relay.segment_put": _request({"id": SEGMENT_ID, "blob": BLOB}),
    "relay.segment_get": _request({"id": SEGMENT_ID}),
    "relay.segment_delete": _request({"ids": Array(SEGMENT_ID, max_len=MAX_SEGMENT_IDS)}),
    "relay.segment_list": _request({}, {"after": Either(SEGMENT_ID, Nil()), "limit": Either(COUNT, Nil()),
                                        "device": Either(Bin(exact=32), Nil())}),
    "relay.rendezvous": _request({"nameplate": Int(MIN_NAMEPLATE, MAX_NAMEPLATE),
                                  "role": OneOf(ROLE_OFFER, ROLE_JOIN)}),
    # Pipe frames are a stream, not requests: they have no rid to echo.
    "relay.pipe": _request({"data": Bin(1, MAX_PIPE_DATA_BYTES)}, rid=False),
    "relay.pipe_close": _request({}, rid=False),
}
# What any other frame must have before its type is judged (to echo its rid).
UNKNOWN = _request({})


def parse_request(message: dict[str, Any]) -> Request:
    """A validated request. Raises RelayError(MALFORMED naming the bad field, TOO_LARGE, or
    UNKNOWN_TYPE) for anything else."""
    kind = message.get("t")
    schema = REQUESTS.get(kind) if type(kind) is str else None
    try:
        (schema or UNKNOWN).check(message)
    except SchemaError as err:
        raise malformed(kind, err) from err
    if schema is None:
        if str(kind).startswith("relay."):
            raise RelayError(UNKNOWN_TYPE, f"unknown relay frame {str(kind)[:64]!r}")
        raise RelayError(UNKNOWN_TYPE, "a relay speaks only relay.* frames")
    m = message
    match kind:
        case "relay.pipe":
            return PipeData(m["data"])
        case "relay.pipe_close":
            return PipeClose()
        case "relay.register":
            return Register(m["rid"], tuple(m["records"]), m.get("token"))
        case "relay.deposit":
            if len(m["envelope"]) > MAX_ENVELOPE_BYTES:
                raise RelayError(TOO_LARGE, f"envelope of {len(m['envelope'])} bytes")
            return Deposit(m["rid"], m["mailbox"], m["envelope"])
        case "relay.fetch":
            limit = MAX_FETCH_ITEMS if m.get("limit") is None else m["limit"]
            return Fetch(m["rid"], m["mailbox"], m["after"], max(1, min(limit, MAX_FETCH_ITEMS)))
        case "relay.ack":
            return Ack(m["rid"], m["mailbox"], m["upto"])
        case "relay.subscribe":
            return Subscribe(m["rid"], m["mailbox"], m["after"], m.get("notify") is True)
        case "relay.records":
            return RecordsGet(m["rid"])
        case "relay.backup_get":
            return BackupGet(m["rid"])
        case "relay.backup_put":
            if len(m["blob"]) > MAX_BACKUP_BYTES:
                raise RelayError(TOO_LARGE, f"backup of {len(m['blob'])} bytes")
            if m["version"] <= m["expected_version"]:
                raise RelayError(MALFORMED, "relay.backup_put: version must exceed expected_version")
            return BackupPut(m["rid"], m["expected_version"], m["version"], m["blob"])
        case "relay.segment_put":
            if len(m["blob"]) > MAX_SEGMENT_BYTES:
                raise RelayError(TOO_LARGE, f"segment of {len(m['blob'])} bytes")
            return SegmentPut(m["rid"], m["id"], m["blob"])
        case "relay.segment_get":
            return SegmentGet(m["rid"], m["id"])
        case "relay.segment_delete":
            return SegmentDelete(m["rid"], tuple(m["ids"]))
        case "relay.segment_list":
            limit = MAX_LISTED if m.get("limit") is None else m["limit"]
            return SegmentList(m["rid"], m.get("after") or b"", max(1, min(limit, MAX_LISTED)),
                               m.get("device") or b"")
        case _:  # "relay.rendezvous", the last of REQUESTS
            return Rendezvous(m["rid"], m["nameplate"], m["role"])


def parse_pipe_data(message: dict[str, Any]) -> bytes:
    """The data of a relay.pipe frame (either direction: neither end trusts the other)."""
    try:
        REQUESTS["relay.pipe"].check(message)
    except SchemaError as err:
        raise malformed("relay.pipe", err) from err
    data: bytes = message["data"]
    return data


def request_cost(message: dict[str, Any]) -> float:
    """What a frame takes from its key's rate bucket: one, or SEGMENT_LIST_COST for a page of
    the segment list (it reads up to MAX_LISTED rows)."""
    return SEGMENT_LIST_COST if message.get("t") == "relay.segment_list" else 1.0


def request_id(message: dict[str, Any]) -> int | None:
    """The rid of a received frame, if it has a valid one (to answer even a malformed frame)."""
    rid = message.get("rid")
    return rid if RID.accepts(rid) else None
