"""Relay frames: what a relay answers, how a device checks the answers, and the relay's rules.

The relay is a dumb mailbox and backup store. Everything here is sans-IO. The vocabulary
(bounds, error codes, RelayError) is in relaycodes.py, the requests and parse_request() in
relayrequests.py; both are re-exported here, where the shells import them from. This module
has the *_frame() builders of the answers, check_answer() (the device's schema check of every
relay.* frame a relay sends), and TokenBucket / Limits, the relay's decisions about rate and
space, with time passed in. protocol/relay.md is the spec of every frame.

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

from .relaycodes import *  # noqa: F403 - the vocabulary, re-exported
from .relaycodes import (
    CIRCLE_ID_BYTES,
    MAX_BACKUP_BYTES,
    MAX_ENVELOPE_BYTES,
    MAX_FETCH_ITEMS,
    MAX_LISTED,
    MAX_RECORD_BYTES,
    MAX_RECORDS,
    MAX_SEGMENT_BYTES,
    QUOTA_EXCEEDED,
    TOO_LARGE,
    RelayError,
    malformed,
)
from .relayrequests import *  # noqa: F403 - the requests, re-exported
from .relayrequests import COUNT, MAILBOX, REQUESTS, RID, SEGMENT_ID, TYPE, request_id
from .schema import Array, Bin, Bool, Either, Float, Int, Map, Nil, Schema, SchemaError, Text, Tuple

# The longest wait a relay.error may ask for before a retry.
MAX_RETRY_AFTER_S = 24 * 3600.0

# ---- Answers (relay -> device) -------------------------------------------------------


def registered_frame(rid: int, circle_id: bytes, limits: Limits, used: int,
                     incarnation: bytes) -> dict[str, Any]:
    return {"t": "relay.registered", "rid": rid, "circle": circle_id, "quota": limits.quota_bytes,
            "used": used, "max_envelope": limits.max_envelope_bytes, "ttl": limits.ttl_s,
            "incarnation": incarnation, "segment_list": True, "removed_segments": True}


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


def segments_frame(rid: int, items: list[tuple[bytes, int]], more: bool) -> dict[str, Any]:
    return {"t": "relay.segments", "rid": rid, "items": [[i, size] for i, size in items], "more": more}


def rendezvous_ready_frame(rid: int) -> dict[str, Any]:
    return {"t": "relay.rendezvous_ready", "rid": rid}


def pipe_frame(data: bytes) -> dict[str, Any]:
    return {"t": "relay.pipe", "data": data}


def pipe_close_frame() -> dict[str, Any]:
    return {"t": "relay.pipe_close"}


def error_frame(rid: int | None, error: RelayError, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": "relay.error", "code": error.code, "message": error.message[:256]}
    if rid is not None:
        frame["rid"] = rid
    if error.retry_after is not None:
        frame["retry_after"] = error.retry_after
    frame.update(fields)
    return frame


# ---- Checking answers (device side: the relay is not trusted) -------------------------

MESSAGE_TEXT = Text(0, 1024)  # 256 characters, each up to 4 bytes


def _answer(fields: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Map:
    return Map({"t": TYPE, **fields}, optional, open_=True)


ANSWERS: dict[str, Map] = {
    "relay.registered": _answer(
        {"rid": RID, "circle": Bin(exact=CIRCLE_ID_BYTES), "quota": COUNT, "used": COUNT,
         "max_envelope": COUNT, "ttl": COUNT},
        {"incarnation": Either(Bin(1, 64), Nil()), "segment_list": Bool(), "removed_segments": Bool()}),
    "relay.ok": _answer({"rid": RID}, {"id": COUNT, "version": COUNT, "freed": COUNT}),
    "relay.envelopes": _answer(
        {"mailbox": MAILBOX,
         "items": Array(Tuple(COUNT, Bin(1, MAX_ENVELOPE_BYTES)), max_len=MAX_FETCH_ITEMS)},
        {"rid": RID, "more": Bool()}),
    "relay.records": _answer({"records": Array(Bin(1, MAX_RECORD_BYTES), max_len=MAX_RECORDS)},
                             {"rid": RID}),
    "relay.backup": _answer({"rid": RID, "version": COUNT,
                             "blob": Either(Bin(1, MAX_BACKUP_BYTES), Nil())}),
    "relay.segment": _answer({"rid": RID, "id": SEGMENT_ID,
                              "blob": Either(Bin(1, MAX_SEGMENT_BYTES), Nil())}),
    "relay.segments": _answer({"rid": RID, "items": Array(Tuple(SEGMENT_ID, Int(1, MAX_SEGMENT_BYTES)),
                                                          max_len=MAX_LISTED), "more": Bool()}),
    "relay.rendezvous_ready": _answer({"rid": RID}),
    "relay.pipe": REQUESTS["relay.pipe"],
    "relay.pipe_close": REQUESTS["relay.pipe_close"],
    # retry_after is bounded: a relay must not park (NaN, a year) or spin (negative) a device.
    "relay.error": _answer({"code": Text(1, 64)},
                           {"rid": RID, "message": MESSAGE_TEXT,
                            "retry_after": Float(0.0, MAX_RETRY_AFTER_S)}),
}


def check_answer(message: dict[str, Any]) -> dict[str, Any]:
    """message, once it fits the schema of its type (any relay.* frame a relay sends);
    frames of other types are left to the caller. Raises RelayError(MALFORMED) naming the
    path to the bad field."""
    kind = message.get("t")
    schema = ANSWERS.get(kind) if type(kind) is str else None
    if schema is not None:
        try:
            schema.check(message)
        except SchemaError as err:
            raise malformed(kind, err) from err
    return message


@dataclass(frozen=True, slots=True)
class Envelopes:
    """A parsed relay.envelopes frame (an answer to fetch/subscribe, or a push)."""

    rid: int | None
    mailbox: bytes
    items: tuple[tuple[int, bytes], ...]
    more: bool


def parse_envelopes(message: dict[str, Any]) -> Envelopes:
    """Validate a relay.envelopes frame on the device side (the relay is not trusted)."""
    check_answer({**message, "t": "relay.envelopes"})
    items = tuple((item[0], item[1]) for item in message["items"])
    return Envelopes(request_id(message), message["mailbox"], items, message.get("more", False))


def parse_error(message: dict[str, Any]) -> RelayError:
    """The RelayError a relay.error frame reports (RelayError MALFORMED if it is not one)."""
    check_answer({**message, "t": "relay.error"})
    return RelayError(message["code"], message.get("message", "")[:256],
                      retry_after=message.get("retry_after"))


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
        """0.0 when the request may go ahead (tokens taken), else seconds until it could. A
        cost above the burst takes a full bucket (it could never hold more)."""
        cost = min(cost, self._burst)
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
