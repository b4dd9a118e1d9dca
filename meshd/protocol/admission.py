"""Who may use a relay, and how much of it: the operator's admission policy (sans-IO).

A relay is open to strangers by design (anyone may found a circle there), so what a
stranger can take must be capped relay-wide, not only per circle:

  - `max_circles`: circles the relay holds; a registration that would add one more is
    refused with `relay-full` (existing circles are served as before);
  - `max_total_bytes`: stored bytes over all circles (envelopes and backups); a deposit or
    backup that would pass it is refused with `relay-full`;
  - `max_connections_per_source`: open connections from one source address; one more is
    answered `too-many-connections` and closed.

The policy `mode` is `open` (any new circle, within the caps above) or `allow-list` (only
the circle ids listed; a new circle elsewhere is refused with `not-admitted`). Circles the
relay already holds are always served. protocol/relay.md, "Limits", is the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .relay import NOT_ADMITTED, RELAY_FULL, TOO_MANY_CONNECTIONS, RelayError

OPEN = "open"
ALLOW_LIST = "allow-list"
MODES = (OPEN, ALLOW_LIST)

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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"admission mode must be one of {', '.join(MODES)}")
        if min(self.max_circles, self.max_total_bytes, self.max_connections_per_source) < 1:
            raise ValueError("relay-wide limits must be positive")

    def check_new_circle(self, circle_id: bytes, circles_held: int) -> None:
        """Raises RelayError unless a circle the relay does not hold yet may be added."""
        if self.mode == ALLOW_LIST and circle_id not in self.allowed_circles:
            raise RelayError(NOT_ADMITTED, "this relay serves only the circles its operator listed")
        if circles_held >= self.max_circles:
            raise RelayError(RELAY_FULL, f"this relay holds its maximum of {self.max_circles} circles")

    def check_store(self, size: int, total_used: int) -> None:
        """Raises RelayError(relay-full) when storing size more bytes passes the relay's cap."""
        if total_used + size > self.max_total_bytes:
            raise RelayError(RELAY_FULL, "this relay's storage is full")

    def check_connection(self, open_from_source: int) -> None:
        if open_from_source >= self.max_connections_per_source:
            raise RelayError(TOO_MANY_CONNECTIONS,
                             f"at most {self.max_connections_per_source} connections per address")
