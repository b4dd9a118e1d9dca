"""The device port's handshakes (protocol/channel.md, "The device port"): which PSKs a device
accepts and offers, a dial, and an accepted connection's handshake. Refusals are logged
aggregated (one line and one event per cause per source host per minute, with a count)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..containment import report_bug
from ..protocol.channel import UnauthorizedPeer
from ..protocol.crypto import PublicKey
from ..protocol.liveness import TIMERS
from ..protocol.memberhandshake import MemberHandshake
from ..quietlog import QuietLogger
from .peer import PeerHost
from .session import stream_address
from .tally import RefusalTally, cause_of, host_of
from .transport import CONNECTION_ERRORS, SecureConnection, open_secure_connection

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

# A responder accepts the newest epochs' PSKs (a device that slept through a few changes
# still gets in, and learns them), an initiator offers its current epoch's, then the
# previous one's.
ACCEPTED_EPOCHS = 8
OFFERED_EPOCHS = 2


class DevicePort:
    def __init__(self, daemon: PeerHost, *, authorize: Callable[[PublicKey], bool],
                 authorize_incoming: Callable[[PublicKey], bool]) -> None:
        self._daemon = daemon
        self._authorize = authorize  # a member
        self._authorize_incoming = authorize_incoming  # a member, or a removed device told so
        self._psks_at: tuple[tuple[bytes, ...], list[bytes]] = ((), [])
        self._refusals = RefusalTally(log, "handshakes", on_report=self._refused)

    def psks(self) -> list[bytes]:
        """The device port's PSKs, newest epoch first: a responder accepts all of them, an
        initiator offers the first two."""
        circle = self._daemon.circle
        if self._psks_at[0] != circle.heads:
            dh = self._daemon.identity.noise
            keys = circle.recent_epochs(dh, ACCEPTED_EPOCHS) or [
                k for _, k in circle.readable_epoch_records(dh)[:ACCEPTED_EPOCHS]]
            self._psks_at = (circle.heads, [k.device_psk for k in keys])
        return list(self._psks_at[1])

    def _refused(self, cause: str, host: str, count: int) -> None:
        self._daemon.events.publish("peer.refused", address=host, reason=cause, count=count)

    async def accept(self, stream: trio.abc.Stream) -> SecureConnection | None:
        """The responder's handshake; None (the stream closed) when it failed."""
        source = stream_address(stream)
        psks = self.psks()
        if not psks:
            await trio.aclose_forcefully(stream)
            return None
        static, rng = self._daemon.identity.noise, self._daemon.rng
        try:
            return await open_secure_connection(
                stream, initiator=False, static=static, authorize=self._authorize_incoming, rng=rng,
                handshake=MemberHandshake(initiator=False, static=static, rng=rng,
                                          authorize=self._authorize_incoming, psks=psks),
            )
        except CONNECTION_ERRORS as err:
            self._daemon.count_error("handshake")
            self._refusals.note(cause_of(err), host_of(source), trio.current_time())
        except Exception as bug:  # a bug in the handshake ends this connection only
            report_bug("connection", bug)
        return None

    async def dial(self, host: str, port: int, *, expected: bytes | None) -> SecureConnection | None:
        """The initiator's handshake with the device at host:port (the one whose key is
        `expected`, or any member); None when it failed (logged, quietly)."""
        def authorize(key: PublicKey) -> bool:
            return self._authorize(key) and (expected is None or key == expected)

        # One PSK per connection: the current epoch's, then the previous one's (the other
        # side may not know the newest epoch yet).
        static, rng = self._daemon.identity.noise, self._daemon.rng
        failure: BaseException | None = None
        for psk in self.psks()[:OFFERED_EPOCHS]:
            try:
                with trio.fail_after(TIMERS.dial_timeout_s):
                    stream = await trio.open_tcp_stream(host, port)
                return await open_secure_connection(
                    stream, initiator=True, static=static, authorize=authorize, rng=rng,
                    handshake=MemberHandshake(initiator=True, static=static, rng=rng,
                                              authorize=authorize, psks=[psk]),
                )
            except (OSError, trio.TooSlowError, UnauthorizedPeer) as err:
                failure = err
                break  # unreachable, or not the device expected: another PSK changes nothing
            except CONNECTION_ERRORS as err:
                failure = err  # most likely closed unanswered: it knows another epoch
        if failure is not None:
            quiet.warning(("dial", host, port, type(failure).__name__), "dialling %s:%d failed: %s",
                          host, port, failure)
        return None
