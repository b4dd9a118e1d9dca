"""The relay protocol's vocabulary: wire bounds, error codes and RelayError.

protocol/relay.md is the spec. relayrequests.py parses what a device asks, relay.py builds
and checks the answers and holds the relay's rules (limits, rate buckets); both use the
bounds and codes defined here.
"""

from __future__ import annotations

from .errors import RemoteProtocolError
from .schema import SchemaError

MAILBOX_ID_BYTES = 32
CIRCLE_ID_BYTES = 32
MAX_RID = 2**63 - 1
MAX_ENVELOPE_BYTES = 1024 * 1024  # the wire limit; a relay may configure a lower one
MAX_BACKUP_BYTES = 15 * 1024 * 1024  # a backup frame must fit one 16 MiB channel message
# Incremental backup (protocol/relay.md): the backup blob is a manifest naming segments.
SEGMENT_ID_BYTES = 16
MAX_SEGMENT_BYTES = 4 * 1024 * 1024
MAX_SEGMENT_IDS = 1024  # per relay.segment_delete
# relay.segment_list: at most this many [id, size] per answer; a page is charged as this many
# requests to the key's rate bucket (it reads up to MAX_LISTED rows).
MAX_LISTED = 1024
SEGMENT_LIST_COST = 16.0
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
BAD_TOKEN = "bad-token"  # a new circle without the relay's enrolment token (or a wrong one)

# After one of these the relay closes the connection: the peer is broken or not allowed.
FATAL_CODES = frozenset({MALFORMED, UNKNOWN_TYPE, NOT_REGISTERED, BAD_RECORDS, NOT_A_MEMBER,
                         NOT_ADMITTED, BAD_TOKEN, TOO_MANY_CONNECTIONS})
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


def malformed(kind: object, err: SchemaError) -> RelayError:
    """The relay's typed error for a frame that does not fit its schema: `malformed`, with
    the frame type and the path to the bad value (never the value)."""
    error = RelayError(MALFORMED, f"{str(kind)[:64]}: {err}")
    error.__cause__ = err
    return error
