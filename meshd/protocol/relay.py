"""Relay frames: what a device may ask a relay, what the relay answers, and its pure rules.

The relay is a dumb mailbox and backup store. Everything here is sans-IO: parse_request()
turns a received message into a validated Request (or raises RelayError "malformed"), the
*_frame() builders make the answers, and TokenBucket / Limits are the relay's decisions about
rate and space, with time passed in. protocol/relay.md is the spec of every frame below.

Every request carries a request id "rid" chosen by the device; the answer to it (a result
or relay.error) echoes the rid, so a device may pipeline requests. Frames the relay pushes
unasked (new envelopes for a subscribed mailbox) carry no rid.

Rendezvous (pairing through the relay): a member offers a nameplate, a new device that has
no circle joins it, and the relay then forwards relay.pipe frames between the two. Those
frames are a byte stream, not requests: they carry no rid and get no answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import RemoteProtocolError

MAILBOX_ID_BYTES = 32
CIRCLE_ID_BYTES = 32
MAX_RID = 2**63 - 1
MAX_ENVELOPE_BYTES = 1024 * 1024  # the wire limit; a relay may configure a lower one
MAX_BACKUP_BYTES = 15 * 1024 * 1024  # a backup frame must fit one 16 MiB channel message
# Incremental backup (protocol/relay.md): the backup blob is a manifest naming segments.
SEGMENT_ID_BYTES = 16
MAX_SEGMENT_BYTES = 4 * 1024 * 1024
MAX_SEGMENT_IDS = 1024  # per relay.segment_delete
MAX_RECORDS = 4096
MAX_RECORD_BYTES = 64 * 1024
MAX_FETCH_ITEMS = 1024
# A relay.envelopes frame stops adding items past this many envelope bytes (one item always
# fits: envelopes are at most 1 MiB and messages 16 MiB).
MAX_FETCH_BYTES = 4 * 1024 * 1024
MAX_SUBSCRIPTIONS = 64
# Rendezvous: nameplates are those of pairing codes (protocol/pairing.md).
MIN_NAMEPLATE = 1
MAX_NAMEPLATE = 999
ROLE_OFFER = "offer"
ROLE_JOIN = "join"
MAX_PIPE_DATA_BYTES = 65535
# An offer waits this long for its join: the lifetime of the invitation it stands for.
OFFER_TTL_S = 600.0
# A pipe lasts at most this long and carries at most this many bytes (both directions):
# a pairing is a handshake and two messages (the welcome below 16 MiB) within ~45 s.
PIPE_LIFETIME_S = 120.0
MAX_PIPE_TOTAL_BYTES = 32 * 1024 * 1024

# ---- Error codes ---------------------------------------------------------------------

MALFORMED = "malformed"  # a frame that does not parse, or a field of the wrong type or size
UNKNOWN_TYPE = "unknown-type"  # a "relay." type this version does not know
NOT_REGISTERED = "not-registered"  # a mailbox or backup request before relay.register
BAD_RECORDS = "bad-records"  # circle records that do not verify
NOT_A_MEMBER = "not-a-member"  # the connection's key is not an active member of the circle
QUOTA_EXCEEDED = "quota-exceeded"  # the circle's storage quota would be exceeded
TOO_LARGE = "too-large"  # an envelope or backup above the relay's size cap
RATE_LIMITED = "rate-limited"  # too many requests from this key; retry_after says when
CONFLICT = "conflict"  # backup_put's expected_version is not the stored version
TOO_MANY_SUBSCRIPTIONS = "too-many-subscriptions"
INTERNAL = "internal"  # the relay failed (e.g. its disk); the request may be retried later
UNAVAILABLE = "unavailable"  # device side only: the connection to the relay is gone
NAMEPLATE_IN_USE = "nameplate-in-use"  # another offer already waits on this nameplate
NO_OFFER = "no-offer"  # a join for a nameplate with no waiting offer
OFFER_EXPIRED = "offer-expired"  # the offer waited OFFER_TTL_S and nobody joined
RENDEZVOUS_BUSY = "rendezvous-busy"  # this connection already has an offer or a pipe
# Relay-wide admission (admission.py): caps over all circles, and the operator's policy.
RELAY_FULL = "relay-full"  # the relay's circle count or total storage is at its cap
NOT_ADMITTED = "not-admitted"  # the operator does not admit this new circle here
TOO_MANY_CONNECTIONS = "too-many-connections"  # from this source address

# After one of these the relay closes the connection: the peer is broken or not allowed.
FATAL_CODES = frozenset({MALFORMED, UNKNOWN_TYPE, NOT_REGISTERED, BAD_RECORDS, NOT_A_MEMBER,
                         NOT_ADMITTED, TOO_MANY_CONNECTIONS})
ERROR_CODES = FATAL_CODES | {QUOTA_EXCEEDED, TOO_LARGE, RATE_LIMITED, CONFLICT, RELAY_FULL,
                             TOO_MANY_SUBSCRIPTIONS, INTERNAL, UNAVAILABLE, NAMEPLATE_IN_USE,
                             NO_OFFER, OFFER_EXPIRED, RENDEZVOUS_BUSY}


class RelayError(RemoteProtocolError):
    """A relay refused a request (or, on the relay, a device's request was refused).

    `code` (also `reason`) is one of the stable codes above; `message` is for a log line.
    """

    def __init__(self, code: str, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.reason = code
        self.message = message
        self.retry_after = retry_after

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_CODES


# ---- Requests (device -> relay) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    rid: int
    records: tuple[bytes, ...]


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
           | SegmentPut | SegmentGet | SegmentDelete | Rendezvous | PipeData | PipeClose)


def _malformed(message: str) -> RelayError:
    return RelayError(MALFORMED, message)


def _field(message: dict[str, Any], name: str, kind: type, *, optional: bool = False) -> Any:
    value = message.get(name)
    if value is None and optional:
        return None
    # bool is an int subclass; a True where an int belongs is still malformed.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _malformed(f"{message.get('t')}: field {name!r} must be {kind.__name__}")
    return value


def _count(message: dict[str, Any], name: str, *, default: int | None = None) -> int:
    if default is not None and message.get(name) is None:
        return default
    value: int = _field(message, name, int)
    if not 0 <= value <= MAX_RID:
        raise _malformed(f"{message.get('t')}: field {name!r} out of range")
    return value


def _mailbox(message: dict[str, Any]) -> bytes:
    value: bytes = _field(message, "mailbox", bytes)
    if len(value) != MAILBOX_ID_BYTES:
        raise _malformed(f"{message.get('t')}: mailbox must be {MAILBOX_ID_BYTES} bytes")
    return value


def _segment_id(value: Any, kind: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != SEGMENT_ID_BYTES:
        raise _malformed(f"{kind}: a segment id is {SEGMENT_ID_BYTES} bytes")
    return value


def parse_request(message: dict[str, Any]) -> Request:
    """A validated request. Raises RelayError(MALFORMED or UNKNOWN_TYPE) for anything else.

    Size caps that depend on the relay's configuration (envelope, backup) are the relay's
    decision, not the parser's; the parser enforces only the wire maxima.
    """
    kind = message.get("t")
    # Pipe frames are a stream, not requests: they have no rid to echo.
    if kind == "relay.pipe":
        return PipeData(parse_pipe_data(message))
    if kind == "relay.pipe_close":
        return PipeClose()
    rid = _count(message, "rid")
    match kind:
        case "relay.register":
            # No records: a device that has none yet (recovery) asks the relay to find the
            # circle its key is a member of.
            records = _field(message, "records", list)
            if len(records) > MAX_RECORDS:
                raise _malformed(f"relay.register: at most {MAX_RECORDS} records")
            for record in records:
                if not isinstance(record, bytes) or not 0 < len(record) <= MAX_RECORD_BYTES:
                    raise _malformed("relay.register: each record is 1..65536 bytes")
            return Register(rid, tuple(records))
        case "relay.deposit":
            envelope = _field(message, "envelope", bytes)
            if not envelope:
                raise _malformed("relay.deposit: an empty envelope")
            if len(envelope) > MAX_ENVELOPE_BYTES:
                # The wire maximum: a larger envelope is refused without reading it.
                raise RelayError(TOO_LARGE, f"envelope of {len(envelope)} bytes")
            return Deposit(rid, _mailbox(message), envelope)
        case "relay.fetch":
            limit = _count(message, "limit", default=MAX_FETCH_ITEMS)
            return Fetch(rid, _mailbox(message), _count(message, "after"),
                         max(1, min(limit, MAX_FETCH_ITEMS)))
        case "relay.ack":
            return Ack(rid, _mailbox(message), _count(message, "upto"))
        case "relay.subscribe":
            return Subscribe(rid, _mailbox(message), _count(message, "after"),
                             message.get("notify") is True)
        case "relay.records":
            return RecordsGet(rid)
        case "relay.backup_get":
            return BackupGet(rid)
        case "relay.backup_put":
            blob = _field(message, "blob", bytes)
            if not blob:
                raise _malformed("relay.backup_put: empty blob")
            if len(blob) > MAX_BACKUP_BYTES:
                raise RelayError(TOO_LARGE, f"backup of {len(blob)} bytes")
            expected, version = _count(message, "expected_version"), _count(message, "version")
            if version <= expected:
                raise _malformed("relay.backup_put: version must exceed expected_version")
            return BackupPut(rid, expected, version, blob)
        case "relay.segment_put":
            blob = _field(message, "blob", bytes)
            if not blob:
                raise _malformed("relay.segment_put: empty blob")
            if len(blob) > MAX_SEGMENT_BYTES:
                raise RelayError(TOO_LARGE, f"segment of {len(blob)} bytes")
            return SegmentPut(rid, _segment_id(message.get("id"), kind), blob)
        case "relay.segment_get":
            return SegmentGet(rid, _segment_id(message.get("id"), kind))
        case "relay.segment_delete":
            ids = _field(message, "ids", list)
            if len(ids) > MAX_SEGMENT_IDS:
                raise _malformed(f"relay.segment_delete: at most {MAX_SEGMENT_IDS} ids")
            return SegmentDelete(rid, tuple(_segment_id(i, kind) for i in ids))
        case "relay.rendezvous":
            nameplate: int = _field(message, "nameplate", int)
            if not MIN_NAMEPLATE <= nameplate <= MAX_NAMEPLATE:
                raise _malformed(f"relay.rendezvous: nameplate must be "
                                 f"{MIN_NAMEPLATE}..{MAX_NAMEPLATE}")
            role = message.get("role")
            if role not in (ROLE_OFFER, ROLE_JOIN):
                raise _malformed("relay.rendezvous: role must be 'offer' or 'join'")
            return Rendezvous(rid, nameplate, role)
        case str() if kind.startswith("relay."):
            raise RelayError(UNKNOWN_TYPE, f"unknown relay frame {kind[:64]!r}")
        case _:
            raise RelayError(UNKNOWN_TYPE, "a relay speaks only relay.* frames")


# ---- Answers (relay -> device) -------------------------------------------------------


def registered_frame(rid: int, circle_id: bytes, limits: Limits, used: int,
                     incarnation: bytes) -> dict[str, Any]:
    return {"t": "relay.registered", "rid": rid, "circle": circle_id, "quota": limits.quota_bytes,
            "used": used, "max_envelope": limits.max_envelope_bytes, "ttl": limits.ttl_s,
            "incarnation": incarnation}


def ok_frame(rid: int, **fields: Any) -> dict[str, Any]:
    return {"t": "relay.ok", "rid": rid, **fields}


def envelopes_frame(
    rid: int | None, mailbox: bytes, items: list[tuple[int, bytes]], more: bool
) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": "relay.envelopes", "mailbox": mailbox,
                             "items": [[i, e] for i, e in items], "more": more}
    if rid is not None:
        frame["rid"] = rid
    return frame


def records_frame(rid: int, records: list[bytes]) -> dict[str, Any]:
    return {"t": "relay.records", "rid": rid, "records": records}


def records_push_frame(records: list[bytes]) -> dict[str, Any]:
    """Unsolicited (no rid): the circle's records changed at the relay."""
    return {"t": "relay.records", "records": records}


def backup_frame(rid: int, version: int, blob: bytes | None) -> dict[str, Any]:
    return {"t": "relay.backup", "rid": rid, "version": version, "blob": blob}


def segment_frame(rid: int, segment_id: bytes, blob: bytes | None) -> dict[str, Any]:
    return {"t": "relay.segment", "rid": rid, "id": segment_id, "blob": blob}


def rendezvous_ready_frame(rid: int) -> dict[str, Any]:
    return {"t": "relay.rendezvous_ready", "rid": rid}


def pipe_frame(data: bytes) -> dict[str, Any]:
    return {"t": "relay.pipe", "data": data}


def pipe_close_frame() -> dict[str, Any]:
    return {"t": "relay.pipe_close"}


def parse_pipe_data(message: dict[str, Any]) -> bytes:
    """The data of a relay.pipe frame (either direction: neither end trusts the other)."""
    data: bytes = _field(message, "data", bytes)
    if not 0 < len(data) <= MAX_PIPE_DATA_BYTES:
        raise _malformed(f"relay.pipe: data must be 1..{MAX_PIPE_DATA_BYTES} bytes")
    return data


def error_frame(rid: int | None, error: RelayError, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": "relay.error", "code": error.code, "message": error.message[:256]}
    if rid is not None:
        frame["rid"] = rid
    if error.retry_after is not None:
        frame["retry_after"] = error.retry_after
    frame.update(fields)
    return frame


def request_id(message: dict[str, Any]) -> int | None:
    """The rid of a received frame, if it has a valid one (to answer even a malformed frame)."""
    rid = message.get("rid")
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_RID:
        return rid
    return None


@dataclass(frozen=True, slots=True)
class Envelopes:
    """A parsed relay.envelopes frame (an answer to fetch/subscribe, or a push)."""

    rid: int | None
    mailbox: bytes
    items: tuple[tuple[int, bytes], ...]
    more: bool


def parse_envelopes(message: dict[str, Any]) -> Envelopes:
    """Validate a relay.envelopes frame on the device side (the relay is not trusted)."""
    items = _field(message, "items", list)
    parsed: list[tuple[int, bytes]] = []
    for item in items:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], int)
                or isinstance(item[0], bool) or not isinstance(item[1], bytes)):
            raise _malformed("relay.envelopes: each item is [id, envelope]")
        parsed.append((item[0], item[1]))
    more = message.get("more", False)
    if not isinstance(more, bool):
        raise _malformed("relay.envelopes: more must be a bool")
    return Envelopes(request_id(message), _mailbox(message), tuple(parsed), more)


def parse_error(message: dict[str, Any]) -> RelayError:
    code = message.get("code")
    text = message.get("message", "")
    retry_after = message.get("retry_after")
    if not isinstance(code, str):
        raise _malformed("relay.error without a code")
    if not isinstance(retry_after, int | float) or isinstance(retry_after, bool):
        retry_after = None
    return RelayError(code[:64], text[:256] if isinstance(text, str) else "",
                      retry_after=retry_after)


# ---- The relay's decisions -----------------------------------------------------------

DEFAULT_QUOTA_BYTES = 256 * 1024 * 1024
DEFAULT_TTL_S = 30 * 24 * 3600
DEFAULT_RATE_PER_S = 200.0
DEFAULT_BURST = 1000.0
DEFAULT_JOIN_RATE_PER_S = 0.5
DEFAULT_JOIN_BURST = 20.0


@dataclass(frozen=True, slots=True)
class Limits:
    """A relay's configuration of what it accepts. Every breach is a relay.error."""

    quota_bytes: int = DEFAULT_QUOTA_BYTES  # per circle: envelopes + backup + segments
    max_envelope_bytes: int = MAX_ENVELOPE_BYTES
    max_backup_bytes: int = MAX_BACKUP_BYTES
    ttl_s: int = DEFAULT_TTL_S
    rate_per_s: float = DEFAULT_RATE_PER_S  # requests per second per device key
    burst: float = DEFAULT_BURST
    # Joins from connections that did not register, per source address: their keys are
    # free to make, so the key's bucket alone does not bound them. Each join burns an
    # offer, so this is what limits how fast a stranger can spoil pairings at this relay.
    join_rate_per_s: float = DEFAULT_JOIN_RATE_PER_S
    join_burst: float = DEFAULT_JOIN_BURST

    def check_deposit(self, size: int, used: int) -> None:
        if size > self.max_envelope_bytes:
            raise RelayError(TOO_LARGE, f"envelope of {size} bytes exceeds {self.max_envelope_bytes}")
        if used + size > self.quota_bytes:
            raise RelayError(QUOTA_EXCEEDED, f"circle quota of {self.quota_bytes} bytes is full")

    def check_segment(self, size: int, used: int) -> None:
        if size > MAX_SEGMENT_BYTES:
            raise RelayError(TOO_LARGE, f"segment of {size} bytes exceeds {MAX_SEGMENT_BYTES}")
        if used + size > self.quota_bytes:
            raise RelayError(QUOTA_EXCEEDED, f"circle quota of {self.quota_bytes} bytes is full")

    def check_backup(self, size: int, used: int, replaced: int) -> None:
        if size > self.max_backup_bytes:
            raise RelayError(TOO_LARGE, f"backup of {size} bytes exceeds {self.max_backup_bytes}")
        if used - replaced + size > self.quota_bytes:
            raise RelayError(QUOTA_EXCEEDED, f"circle quota of {self.quota_bytes} bytes is full")


class TokenBucket:
    """rate tokens per second up to burst; each request takes one. Time is passed in."""

    __slots__ = ("_rate", "_burst", "_tokens", "_at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._at = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """0.0 when the request may go ahead (tokens taken), else seconds until it could."""
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= cost:
            self._tokens -= cost
            return 0.0
        return (cost - self._tokens) / self._rate if self._rate > 0 else float("inf")

    def full(self, now: float) -> bool:
        return self._tokens + (now - self._at) * self._rate >= self._burst

    def debit(self, now: float, cost: float) -> None:
        """Tokens spent elsewhere (at another process of the same relay): taken without
        asking, down to empty."""
        self._tokens = max(0.0, min(self._burst, self._tokens + (now - self._at) * self._rate) - cost)
        self._at = now
