"""When a connection is dead, and every timer a connection runs on, named in one place.

A connection's timers (protocol/channel.md "Keepalive and dead peers", protocol/peers.md):

  keepalive_s     the channel's tick (protocol/channel.py): at a tick, a side that sent
                  nothing since the previous tick sends a KEEPALIVE, so a live peer is never
                  quiet for more than 2 * keepalive_s, plus the network's delay.
  silence_s       dead when nothing at all (not even a keepalive) arrived for silence_s,
                  measured from the last bytes received, exactly (not on the tick grid).
  write_stall_s   dead when a write made no progress (one WRITE_PIECE_BYTES piece not taken
                  by the stream) for write_stall_s: the peer stopped reading, or a partition
                  filled both send buffers.
  handshake_s     a handshake not finished by then fails (the channel's own deadline).
  rekey_s         a sender rekeys its direction after this long (the channel, at a tick).
  suspect_s       the peer manager probes a connection quiet this long with a fresh dial,
                  which replaces it (after a healed partition TCP's retransmission backoff
                  can leave the old one quiet for long after the heal). Just over the
                  quietest a live peer can be (2 * keepalive_s), so a partition of P s
                  (P < silence_s) is probed by max(heal, cut + suspect_s); a probe of a live
                  peer whose keepalive was late only replaces its connection.
  dial_timeout_s  one dial's TCP connect.
  backoff_base_s, backoff_cap_s   redials after a failure or a dead connection.

The bound (tests/protocol/test_liveness.py): if nothing from the peer arrives after time c
(a cut), the connection is declared dead by c + silence_s, whatever its writes do, stalled
or not; it is reported gone (`connected: false`) as the connection ends, with nothing to wait
for (transport.py closes the stream without a goodbye). So a silent peer is reported gone
within silence_s = 40 s of the cut: 5 s inside the spec's 45 s. A live peer, whose bytes
arrive at least every 2 * keepalive_s + the network's delay, is never declared dead while
that delay stays under silence_s - 2 * keepalive_s = 10 s.

Sans-IO: time is an argument. The shell (net/transport.py) reports receipts and writes, sleeps
until `deadline`, and calls `check(now)`, which raises the typed error that ends the
connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .constants import HANDSHAKE_TIMEOUT_S, KEEPALIVE_S, REKEY_AFTER_S
from .errors import RemoteProtocolError


@dataclass(frozen=True)
class ConnectionTimers:
    keepalive_s: float = KEEPALIVE_S
    silence_s: float = 40.0
    write_stall_s: float = 40.0
    handshake_s: float = HANDSHAKE_TIMEOUT_S
    rekey_s: float = REKEY_AFTER_S
    suspect_s: float = 2 * KEEPALIVE_S + 2.0
    dial_timeout_s: float = 5.0
    backoff_base_s: float = 0.5
    # Low, so a device reconnects within seconds of a network healing (a dial is one SYN).
    backoff_cap_s: float = 8.0

    def __post_init__(self) -> None:
        # A live peer must never look dead, nor a quiet live one suspect for no reason.
        if not 2 * self.keepalive_s < self.suspect_s < self.silence_s:
            raise ValueError("need 2 * keepalive_s < suspect_s < silence_s")

    @property
    def delay_slack_s(self) -> float:
        """How late a live peer's keepalive may arrive without the peer being declared dead."""
        return self.silence_s - 2 * self.keepalive_s

    def gone_by(self, cut_at: float) -> float:
        """The latest time a peer from which nothing arrives after cut_at is declared dead."""
        return cut_at + self.silence_s


TIMERS = ConnectionTimers()


class PeerSilent(RemoteProtocolError):
    reason = "peer-silent"


class PeerNotReading(RemoteProtocolError):
    reason = "peer-not-reading"


class Liveness:
    """One connection's liveness: when it last heard from the peer, whether a write is stuck."""

    def __init__(self, now: float, timers: ConnectionTimers = TIMERS) -> None:
        self.timers = timers
        self.received_at = now  # the last bytes from the peer (or the start)
        self._write_started_at: float | None = None  # the piece being written, if any

    def received(self, now: float) -> None:
        """Bytes arrived (any: a keepalive counts)."""
        self.received_at = now

    def write_started(self, now: float) -> None:
        """A piece of a write was handed to the stream (and the previous one was taken)."""
        self._write_started_at = now

    def write_finished(self) -> None:
        self._write_started_at = None

    @property
    def writing_since(self) -> float | None:
        return self._write_started_at

    @property
    def deadline(self) -> float:
        """When check() may next find the connection dead."""
        started = self._write_started_at
        stall_at = math.inf if started is None else started + self.timers.write_stall_s
        return min(self.received_at + self.timers.silence_s, stall_at)

    def check(self, now: float) -> None:
        """Raise PeerNotReading or PeerSilent if the connection is dead at `now` (a stalled
        write is named first: it is the more specific of the two when both hold)."""
        started = self._write_started_at
        if started is not None and now >= started + self.timers.write_stall_s:
            raise PeerNotReading(
                f"peer read nothing for {self.timers.write_stall_s:g} s (a write made no progress)")
        if now >= self.received_at + self.timers.silence_s:
            raise PeerSilent(f"peer silent for {self.timers.silence_s:g} s")
