"""One log line per gap in a sender's relay envelopes, not one per envelope.

When a relay delivers a sender's envelopes ahead of a missing one (dropped, or still on
another relay), every later envelope arrives "ahead" until the hole fills: after a long
absence that was hundreds of identical warnings. GapReporter logs the gap once when it opens
(with the holes) and once when it closes (with how many envelopes arrived around it).
"""

from __future__ import annotations

import logging

from .identity import fingerprint

log = logging.getLogger("meshd.relay.links")


class GapReporter:
    def __init__(self) -> None:
        self._open: dict[bytes, int] = {}  # sender -> envelopes that arrived out of order

    def is_open(self, sender: bytes) -> bool:
        return sender in self._open

    def arrived(self, relay: str, sender: bytes, seq: int, holes: list[tuple[int, int]]) -> None:
        """After an envelope from sender was accepted; holes: what is still missing."""
        if holes:
            if sender not in self._open:
                self._open[sender] = 0
                log.warning("relay %s: envelopes from %s arrive out of order from %d on (missing: %s); "
                            "reported again when the gap fills", relay, fingerprint(sender), seq, holes)
            self._open[sender] += 1
        elif sender in self._open:
            count = self._open.pop(sender)
            log.info("relay %s: the gap in envelopes from %s filled (%d arrived out of order)",
                     relay, fingerprint(sender), count + 1)
