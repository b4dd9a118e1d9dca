"""Persistent local errors (a full disk, a read-only store): pause, and say so once.

A sync or relay step that fails on this device's own storage is retried, but not at once: a
full disk stays full, and retrying in a tight loop costs CPU, churns connections and floods
the log (71 identical errors in 6 s were measured). LocalErrorBackoff holds the pause, which
doubles from BASE_S to CAP_S while the failures keep coming and starts over after a quiet
spell, and tells the caller whether a failure is worth a log line: the first of an episode,
then at most one per CAP_S (the rest go to debug). Time is passed in (trio.current_time()).
"""

from __future__ import annotations

BASE_S = 1.0
CAP_S = 60.0


class LocalErrorBackoff:
    def __init__(self, *, base_s: float = BASE_S, cap_s: float = CAP_S) -> None:
        self._base_s = base_s
        self._cap_s = cap_s
        self._delay = 0.0
        self._last_failure = -float("inf")
        self._next_log = -float("inf")
        self.until = -float("inf")  # paused until then
        self.failures = 0  # in this episode

    def paused(self, now: float) -> bool:
        return now < self.until

    def failed(self, now: float) -> bool:
        """Record a failure; True if it deserves a log line (else log it at debug)."""
        if now - self._last_failure > 2 * max(self._delay, self._base_s):
            self._delay = self._base_s  # a new episode
            self.failures = 0
        else:
            self._delay = min(self._cap_s, self._delay * 2)
        self.failures += 1
        self._last_failure = now
        self.until = now + self._delay
        if now >= self._next_log:
            self._next_log = now + self._cap_s
            return True
        return False

    @property
    def delay(self) -> float:
        return self._delay
