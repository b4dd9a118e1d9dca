"""A per-connection limit on the bytes a peer may make us read: a member (or a relay, or a
stranger mid-handshake) that floods is throttled, and the others keep their share.

Every SecureConnection reads through a ReadBudget (transport.py): a token bucket of bytes,
refilled at `bytes_per_s` up to `burst`. Each read is charged its bytes plus FRAME_COST per
transport frame it held (so a flood of tiny frames, whose cost is per frame, counts too). A
read may take the balance below zero; the next read then waits until it is back to zero.
Waiting is the throttle: the connection's reader stops reading, the kernel's buffers fill,
and TCP pushes back on the sender, whose own stalled-write timer ends the connection if it
insists (protocol/channel.md, "Timers"). What the peer can make us read in any span of t
seconds is at most burst + bytes_per_s * t + one read (transport.RECEIVE_BYTES).

The default is far above what sync needs (a catch-up of 1,000,000 entries is ~200 MB in
~10 s, 20 MB/s): it bounds a flood, it does not shape legitimate traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

# Charged per transport frame on top of its bytes: a frame's fixed cost (decrypt, event,
# dispatch) is worth this many bytes of bulk data.
FRAME_COST = 64


@dataclass(frozen=True, slots=True)
class ByteRate:
    bytes_per_s: float
    burst: float


PEER_BYTE_RATE = ByteRate(bytes_per_s=64 * 1024 * 1024, burst=64 * 1024 * 1024)


class ReadBudget:
    """The bucket of one connection's reads (trio clock)."""

    __slots__ = ("_per_s", "_burst", "_balance", "_at", "throttled_s")

    def __init__(self, rate: ByteRate, now: float) -> None:
        # The rate's two fields, copied: spend() runs once per read, and reads them there.
        self._per_s = rate.bytes_per_s
        self._burst = rate.burst
        self._balance = rate.burst
        self._at = now
        self.throttled_s = 0.0  # how long reads waited, in all (for tests and metrics)

    def _refill(self, now: float) -> None:
        self._balance = min(self._burst, self._balance + (now - self._at) * self._per_s)
        self._at = now

    @property
    def in_debt(self) -> bool:
        """Whether the next read may have to wait (the balance is below zero; refilling
        only raises it, so a read with a balance at or above zero never waits)."""
        return self._balance < 0

    def delay(self, now: float) -> float:
        """Seconds until the next read may start (0.0: now)."""
        self._refill(now)
        return 0.0 if self._balance >= 0 else -self._balance / self._per_s

    def spend(self, now: float, nbytes: int, frames: int) -> None:
        # _refill(now) written out: this runs once per read.
        balance = self._balance + (now - self._at) * self._per_s
        if balance > self._burst:
            balance = self._burst
        self._balance = balance - (nbytes + FRAME_COST * frames)
        self._at = now

    async def before_read(self) -> None:
        """Wait until the peer is within its rate again."""
        wait = self.delay(trio.current_time())
        if wait > 0:
            self.throttled_s += wait
            await trio.sleep(wait)
