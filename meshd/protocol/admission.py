"""Who may use a relay, and how much of it: the operator's admission policy (sans-IO).

A relay is open to strangers by design (anyone may found a circle there), so what a
stranger can take must be capped relay-wide, not only per circle:

  - `max_circles`: circles the relay holds; a registration that would add one more is
    refused with `relay-full` (existing circles are served as before);
  - `max_total_bytes`: stored bytes over all circles (envelopes and backups); a deposit or
    backup that would pass it is refused with `relay-full`;
  - `max_connections_per_source`: open connections from one source address; one more is
    answered `too-many-connections` and closed.

The policy `mode` is `open` (any new circle, within the caps above), `allow-list` (only
the circle ids listed; a new circle elsewhere is refused with `not-admitted`) or `token`
(a new circle's registration must carry the relay's enrolment token, which `meshd relay`
makes once and prints; without it, or with another, `bad-token`). Circles the relay already
holds are always served, and need no token. protocol/relay.md, "Limits", is the spec.

The token is a secret: compared in constant time, never in a repr, an error or a log line.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass, field

from .relaycodes import BAD_TOKEN, NOT_ADMITTED, RELAY_FULL, TOO_MANY_CONNECTIONS, RelayError

OPEN = "open"
ALLOW_LIST = "allow-list"
TOKEN = "token"
MODES = (OPEN, ALLOW_LIST, TOKEN)
TOKEN_BYTES = 32

DEFAULT_MAX_CIRCLES = 10_000
DEFAULT_MAX_TOTAL_BYTES = 64 * 1024**3
DEFAULT_MAX_CONNECTIONS_PER_SOURCE = 256


@dataclass(frozen=True)
class Admission:
    mode: str = OPEN
    allowed_circles: frozenset[bytes] = field(default_factory=frozenset)
    max_circles: int = DEFAULT_MAX_CIRCLES
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_connections_per_source: int = DEFAULT_MAX_CONNECTIONS_PER_SOURCE
    token: bytes | None = field(default=None, repr=False)  # the enrolment token (token mode)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"admission mode must be one of {', '.join(MODES)}")
        if min(self.max_circles, self.max_total_bytes, self.max_connections_per_source) < 1:
            raise ValueError("relay-wide limits must be positive")
        if (self.mode == TOKEN) != (self.token is not None):
            raise ValueError("an enrolment token goes with token mode, and only with it")
        if self.token is not None and len(self.token) != TOKEN_BYTES:
            raise ValueError(f"an enrolment token is {TOKEN_BYTES} bytes")

    def check_new_circle(self, circle_id: bytes, circles_held: int, token: bytes | None = None) -> None:
        """Raises RelayError unless a circle the relay does not hold yet may be added (by a
        registration that carried `token`)."""
        if self.mode == ALLOW_LIST and circle_id not in self.allowed_circles:
            raise RelayError(NOT_ADMITTED, "this relay serves only the circles its operator listed")
        if self.mode == TOKEN and not self.token_matches(token):
            raise RelayError(BAD_TOKEN, "a new circle here needs this relay's enrolment token "
                             "(the one `meshd relay` printed); it was " + (
                                 "missing" if token is None else "not that token"))
        if circles_held >= self.max_circles:
            raise RelayError(RELAY_FULL, f"this relay holds its maximum of {self.max_circles} circles")

    def token_matches(self, token: bytes | None) -> bool:
        """Whether `token` is the enrolment token, in time independent of where they differ."""
        expected = self.token or b""
        given = token if token is not None else b""
        # compare_digest's time depends on the lengths only (both public: 32 and the frame's).
        return bool(expected) and hmac.compare_digest(expected, given)

    def check_store(self, size: int, total_used: int) -> None:
        """Raises RelayError(relay-full) when storing size more bytes passes the relay's cap."""
        if total_used + size > self.max_total_bytes:
            raise RelayError(RELAY_FULL, "this relay's storage is full")

    def check_connection(self, open_from_source: int) -> None:
        if open_from_source >= self.max_connections_per_source:
            raise RelayError(TOO_MANY_CONNECTIONS,
                             f"at most {self.max_connections_per_source} connections per address")


def format_token(token: bytes) -> str:
    """How `meshd relay` prints a token and `meshctl relay add --token` takes it: base64url."""
    return base64.urlsafe_b64encode(token).decode().rstrip("=")


def parse_token(text: str) -> bytes:
    """The token a person typed. Raises ValueError, without echoing the text (it is a
    secret, perhaps with one typo)."""
    try:
        token = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("an enrolment token is the base64url text `meshd relay` printed") from None
    if len(token) != TOKEN_BYTES or format_token(token) != text.strip():
        raise ValueError(f"an enrolment token is {TOKEN_BYTES} bytes in base64url, as "
                         "`meshd relay` printed it") from None
    return token
