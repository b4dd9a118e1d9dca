"""What went wrong with each relay, kept where people look: /v1/relays, /v1/status, /metrics
and `meshctl status`, not only the event stream and the log.

Two kinds of trouble, both per relay and since the daemon started:

- misbehaviour: the relay served something a correct relay never does (an older backup
  than one already seen, envelopes or records that fail verification). It stays shown:
  one such answer is enough reason to distrust that relay.
- sequence holes: envelopes of a sender arrived beyond the next expected one, so earlier
  ones are missing (a relay dropped them, or they are still on another relay). Shown while
  the hole is open; it closes when the missing envelopes arrive from any relay, or when
  what they held arrives again (the sender deposits again from this device's vector, under
  new seqs: relay/mailboxes.py).

Each is counted in meshd_relay_misbehaviour_total{reason} (holes as reason "hole") and
published as an event (relay.misbehaved; holes: relay.sequence, by the caller).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..api.events import EventBus
from ..api.metrics import Counter

HOLE = "hole"


@dataclass(slots=True)
class _Trouble:
    reason: str
    detail: str
    at: float
    count: int = 1


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class RelayHealth:
    def __init__(self, events: EventBus, counter: Counter,
                 clock: Callable[[], float] = time.time) -> None:
        self._events = events
        self._counter = counter
        self._clock = clock
        self._misbehaviour: dict[str, _Trouble] = {}  # relay -> the latest misbehaviour
        self._holes: dict[tuple[str, bytes], _Trouble] = {}  # (relay, sender) -> open hole

    def misbehaved(self, relay: str, reason: str, detail: str) -> None:
        """Record, count and publish it (the caller has logged it, with its context)."""
        previous = self._misbehaviour.get(relay)
        self._misbehaviour[relay] = _Trouble(reason, detail, self._clock(),
                                             (previous.count + 1) if previous else 1)
        self._counter.inc(reason=reason)
        self._events.publish("relay.misbehaved", relay=relay, reason=reason, detail=detail)

    def hole(self, relay: str, sender: bytes, missing: int) -> None:
        """Envelopes of sender arrived from relay beyond a hole of `missing` envelopes."""
        key = (relay, sender)
        if key in self._holes:
            self._holes[key].detail = self._hole_detail(sender, missing)
            return
        self._holes[key] = _Trouble(HOLE, self._hole_detail(sender, missing), self._clock())
        self._counter.inc(reason=HOLE)

    def filled(self, sender: bytes) -> None:
        """Nothing of sender is missing any more (whichever relay brought it)."""
        for key in [k for k in self._holes if k[1] == sender]:
            del self._holes[key]

    @staticmethod
    def _hole_detail(sender: bytes, missing: int) -> str:
        return f"{missing} envelope(s) from {sender.hex()[:16]} missing"

    def annotate(self, relay: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Add this relay's trouble to its /v1/relays entry: `misbehaviour` and `holes`, and an
        `error` naming it (with reason and time) unless a connection error is shown."""
        trouble = self._misbehaviour.get(relay)
        holes = [t for (r, _), t in self._holes.items() if r == relay]
        if trouble is not None:
            entry["misbehaviour"] = {"reason": trouble.reason, "detail": trouble.detail,
                                     "at": trouble.at, "count": trouble.count}
        if holes:
            entry["holes"] = [{"detail": t.detail, "since": t.at} for t in holes]
        if not entry.get("error"):
            shown = trouble or (holes[0] if holes else None)
            if shown is not None:
                entry["error"] = f"{shown.reason} at {_when(shown.at)}: {shown.detail}"
        return entry

    def total(self) -> int:
        """Misbehaviours seen and holes open now, over every relay (status)."""
        return sum(t.count for t in self._misbehaviour.values()) + len(self._holes)
