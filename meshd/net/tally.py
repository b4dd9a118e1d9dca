"""Bounded, aggregated logging of refusals: one line per cause per source per interval.

A stranger can open thousands of connections a second; each failed handshake must not be
a log line (or an event). RefusalTally logs the first refusal of a (cause, source) pair at
once, counts the rest, and when the next one arrives after the interval has passed logs
one summary: "refused 3412 handshakes from 127.0.0.1 in the last 60 s (bad MAC)". The
source is a host without its port (a new port per connection would defeat the grouping)
and the cause is a short code (an error's `reason`, or its type and message with numbers
and key names blanked), never text that carries a key. Remembered pairs are bounded and swept, so an attack from many
addresses leaves no memory behind once it ends.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

INTERVAL_S = 60.0
MAX_PAIRS = 1024
OTHER = "other addresses"


@dataclass
class _Window:
    started: float
    count: int  # refusals in this window after its first (the first was logged at once)


class RefusalTally:
    """Counts refusals by (cause, source). on_report(cause, source, count) is called with
    every line logged (the first refusal, then each interval's count), e.g. for events."""

    def __init__(self, logger: logging.Logger, what: str, *, verb: str = "refused",
                 interval_s: float = INTERVAL_S, max_pairs: int = MAX_PAIRS,
                 on_report: Callable[[str, str, int], None] | None = None) -> None:
        self._logger = logger
        self._what = what  # a plural noun: "handshakes"
        self._verb = verb  # "refused", "dropped"
        self._interval_s = interval_s
        self._max_pairs = max_pairs
        self._on_report = on_report
        self._windows: dict[tuple[str, str], _Window] = {}
        self._swept = -float("inf")

    def __len__(self) -> int:
        return len(self._windows)

    def note(self, cause: str, source: str, now: float, detail: str = "") -> None:
        """Count one refusal. detail (the first error's text, no secrets) is logged only
        with the first refusal of a pair."""
        if now - self._swept >= self._interval_s:
            self.sweep(now)
        key = (cause, source)
        window = self._windows.get(key)
        if window is None and len(self._windows) >= self._max_pairs:
            self.sweep(now)
            if len(self._windows) >= self._max_pairs:
                key = (cause, OTHER)
                window = self._windows.get(key)
        if window is not None:
            window.count += 1
            return
        self._windows[key] = _Window(now, 0)
        singular = self._what[:-1] if self._what.endswith("s") else self._what
        self._logger.warning("%s %s from %s: %s%s (more are counted, one line per %g s)",
                             self._verb, singular, key[1], cause,
                             f": {detail[:200]}" if detail else "", self._interval_s)
        self._report(key, 1)

    def sweep(self, now: float) -> None:
        """Log each ended window's count and start the next; forget windows that stayed
        empty for a whole interval (so memory returns to nothing after an attack)."""
        self._swept = now
        for key, window in list(self._windows.items()):
            if now - window.started < self._interval_s:
                continue
            if not window.count:
                del self._windows[key]
                continue
            self._logger.warning("%s %d %s from %s in the last %g s (%s)", self._verb,
                                 window.count, self._what, key[1], round(now - window.started),
                                 key[0])
            self._report(key, window.count)
            self._windows[key] = _Window(now, 0)

    def _report(self, key: tuple[str, str], count: int) -> None:
        if self._on_report is not None:
            self._on_report(key[0], key[1], count)


def host_of(address: str | None) -> str:
    """'127.0.0.1' from '127.0.0.1:5555' ('[::1]:5555' -> '::1'); 'unknown' for None."""
    if not address:
        return "unknown"
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return address
    return host.strip("[]")


def cause_of(err: BaseException) -> str:
    """A short code for an error: its `reason` when it has one, else its type and message
    with numbers and key names blanked ("handshake frame of N bytes exceeds N"), so one
    kind of failure is one cause however the attacker varies its sizes or keys."""
    reason = getattr(err, "reason", None)
    if isinstance(reason, str) and reason and len(reason) <= 40:
        return reason
    text = _KEYS.sub("peer(…)", str(err))
    return f"{type(err).__name__}: {_NUMBERS.sub('N', text)[:80]}"


_KEYS = re.compile(r"peer\([^)]*\)")
_NUMBERS = re.compile(r"\b\d+\b")
