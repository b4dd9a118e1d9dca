"""The peer manager: one live secure connection per circle device, kept synced and kept alive.

Either side may dial (a discovery sighting, a configured address, a reconnect). When both
dial at once, both ends keep the connection initiated by the device with the lower static
key, so they agree without a round trip. Each connection carries circle gossip
("circle.heads" / "circle.want" / "circle.records") and log sync ("log.*"); any bad input
ends that connection only. Redials use jittered exponential backoff. The timers (dial
timeout, backoff, the suspect-silence probe; a connection's own keepalive and dead-peer
bounds) are named in protocol/liveness.py. Peer and PeerHost are in peer.py, the session
run over each connection in session.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import trio

from ..containment import report_bug
from ..identity import fingerprint
from ..localerrors import LocalErrorBackoff
from ..protocol.crypto import PublicKey, short_key
from ..protocol.discovery import short_device_id
from ..protocol.liveness import TIMERS
from ..protocol.removal import removal_notice
from ..quietlog import QuietLogger
from ..store.db import StoreError
from .deviceport import DevicePort
from .peer import Backoff, Peer, PeerHost
from .session import converse, new_gossip, remote_address, single_connection_error
from .tally import cause_of
from .transport import CONNECTION_ERRORS, PeerClosed, SecureConnection

__all__ = ["Backoff", "Peer", "PeerHost", "PeerManager"]

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

# Both sides dial as soon as they see each other; when both connections succeed the
# duplicate rule (_keep) keeps the lower key's at both ends. A wait for the higher key (1 s
# once) saved that duplicate handshake but cost a restart of the lower-key device a second.
HIGHER_KEY_DIAL_DELAY_S = 0.0
# Sending a removed device its removal notice (a few KiB) before closing.
NOTICE_TIMEOUT_S = 5.0


class PeerManager:
    def __init__(self, daemon: PeerHost, *, static_addresses: Sequence[tuple[str, int]] = ()) -> None:
        self._store_trouble = LocalErrorBackoff()
        self._daemon = daemon
        self._peers: dict[bytes, Peer] = {}  # by X25519 static key
        self._static_addresses = list(static_addresses)
        self._static_backoff = {address: Backoff() for address in static_addresses}
        self._static_peer: dict[tuple[str, int], bytes] = {}  # configured address -> its key
        self._random = random.Random()
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[SecureConnection, trio.CancelScope] = {}
        self._close_reasons: dict[SecureConnection, str] = {}
        self._port = DevicePort(daemon, authorize=self.authorize,
                                authorize_incoming=self._authorize_incoming)

    # -- membership ---------------------------------------------------------------------

    def sync_members(self) -> None:
        """Bring the peer table in line with the circle; drop removed devices at once."""
        state = self._daemon.circle.state
        own = self._daemon.identity.noise.public
        members = {d.dh_key: d for d in state.devices() if d.dh_key != own}
        if not self._daemon.is_member:
            members = {}  # removed: no peer to dial or accept (protocol/circle.md, "Removal notice")
        for dh_key, peer in list(self._peers.items()):
            if dh_key not in members:
                del self._peers[dh_key]
                if peer.connection is not None:
                    log.warning("closing the connection to %s: removed from the circle", peer.name)
                    self._end(peer, "removed from the circle")
        for dh_key, device in members.items():
            if dh_key not in self._peers:
                self._peers[dh_key] = Peer(device.sign_key, dh_key, device.name)
            else:
                self._peers[dh_key].name = device.name
        self._wakeup.set()

    def authorize(self, remote_static: PublicKey) -> bool:
        return remote_static in self._peers

    def _authorize_incoming(self, remote_static: PublicKey) -> bool:
        """A member, or a removed device that is only handed its removal notice (peers.md)."""
        return self.authorize(remote_static) or bool(self._removal_notice(remote_static))

    def _removal_notice(self, remote_static: bytes) -> list[bytes]:
        """What a device is told before the connection closes: its own removal, or, by a
        device that was removed (e.g. removed itself), that device's removal, to a member."""
        circle = self._daemon.circle
        if self._daemon.is_member:
            return removal_notice(circle, bytes(remote_static))
        if circle.state.member_by_dh(bytes(remote_static)) is None:
            return []
        return removal_notice(circle, bytes(self._daemon.identity.noise.public))

    async def tell_all(self, message: dict[str, Any]) -> None:
        """Send message on every open connection and wait until it is written (bounded)."""
        async with trio.open_nursery() as nursery:
            for peer in self._peers.values():
                if peer.connection is not None:
                    nursery.start_soon(self._send_quietly, peer.connection, message)

    def peers(self) -> list[Peer]:
        return sorted(self._peers.values(), key=lambda p: p.name)

    def peer_by_hint(self, hint: bytes) -> Peer | None:
        for peer in self._peers.values():
            if short_device_id(peer.sign_key) == hint:
                return peer
        return None

    def connected_sign_keys(self) -> set[bytes]:
        return {p.sign_key for p in self._peers.values() if p.connection is not None and p.confirmed}

    # -- discovery input ----------------------------------------------------------------

    def sighted(self, peer: Peer, addresses: Sequence[str], port: int) -> None:
        found = [(address, port) for address in addresses]
        now = trio.current_time()
        if found != peer.addresses:
            peer.addresses = found
            peer.sighted_at = now
            peer.backoff.succeeded()  # a new address deserves an immediate try
        peer.last_seen = time.time()
        self._wakeup.set()

    # -- running ------------------------------------------------------------------------

    async def run(self, listeners: list[trio.SocketListener], *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.sync_members()
            nursery.start_soon(self._serve, listeners)
            nursery.start_soon(self._dial_loop)
            task_status.started()

    def close_all(self, reason: str) -> None:
        """End every connection; each says `reason` to its peer as it closes."""
        for peer in self._peers.values():
            self._end(peer, reason)

    def broadcast(self, message: dict[str, Any]) -> None:
        for peer in self._peers.values():
            if peer.connection is not None and self._nursery is not None:
                self._nursery.start_soon(self._send_quietly, peer.connection, message)

    async def _send_quietly(self, connection: SecureConnection, message: dict[str, Any]) -> None:
        try:
            await connection.send(message)
        except CONNECTION_ERRORS:
            pass  # the connection's reader notices and reports the failure

    def _end(self, peer: Peer, reason: str) -> None:
        """Cancel the task running peer's connection; it says `reason` to the peer as it closes."""
        connection = peer.connection
        if connection is not None and connection in self._scopes:
            self._close_reasons[connection] = reason
            self._scopes[connection].cancel()

    async def _serve(self, listeners: list[trio.SocketListener]) -> None:
        async def accept_one(stream: trio.abc.Stream) -> None:
            connection = await self._port.accept(stream)
            if connection is not None:
                await self._run_connection(connection, initiated_by_us=False)

        await trio.serve_listeners(accept_one, listeners)

    async def _dial_loop(self) -> None:
        assert self._nursery is not None
        own = self._daemon.identity.noise.public
        while True:
            now = trio.current_time()
            next_due = math.inf
            for peer in list(self._peers.values()):
                if peer.dialing or not peer.addresses:
                    continue
                if peer.connection is not None:
                    # A connection silent for longer than a live peer stays quiet may be
                    # stuck (a healed partition under TCP retransmission backoff): probe
                    # with a new one, which replaces it (see _keep), while it stays so.
                    suspect_at = peer.connection.received_at + TIMERS.suspect_s
                    if not peer.confirmed or now < suspect_at:
                        next_due = min(next_due, suspect_at)
                        continue
                due = peer.backoff.not_before
                if peer.dh_key < own and peer.backoff.failures == 0:
                    due = max(due, peer.sighted_at + HIGHER_KEY_DIAL_DELAY_S)
                if due <= now:
                    if peer.connection is not None:
                        log.info("connection to %s quiet for %.0f s: probing with a new dial",
                                 peer.name, now - peer.connection.received_at)
                    peer.dialing = True
                    self._nursery.start_soon(self._dial_peer, peer)
                else:
                    next_due = min(next_due, due)
            for address, backoff in self._static_backoff.items():
                if not self._daemon.is_member:
                    break  # removed: it dials no one
                if backoff.not_before <= now and not self._static_connected(address):
                    backoff.not_before = math.inf  # one dial at a time per address
                    self._nursery.start_soon(self._dial_static, address)
                elif backoff.not_before != math.inf:
                    next_due = min(next_due, backoff.not_before)
            self._wakeup = trio.Event()
            with trio.move_on_at(next_due):
                await self._wakeup.wait()

    def _static_connected(self, address: tuple[str, int]) -> bool:
        peer = self._peers.get(self._static_peer.get(address, b""))
        return peer is not None and peer.connection is not None

    async def _dial_peer(self, peer: Peer) -> None:
        dialling = True
        try:
            for host, port in list(peer.addresses):
                connection = await self._port.dial(host, port, expected=peer.dh_key)
                if connection is not None:
                    # Dialled: no longer "dialling", so the loop may probe this connection
                    # when it goes quiet, whichever side dialled it.
                    dialling = peer.dialing = False
                    self._wakeup.set()
                    await self._run_connection(connection, initiated_by_us=True)
                    return
            peer.backoff.failed(trio.current_time(), self._random)
        finally:
            if dialling:  # else a later dial (a probe) may be under way: it is not ours
                peer.dialing = False
                self._wakeup.set()

    async def _dial_static(self, address: tuple[str, int]) -> None:
        backoff = self._static_backoff[address]
        connection = await self._port.dial(*address, expected=None)
        if connection is None:
            backoff.failed(trio.current_time(), self._random)
        else:
            self._static_peer[address] = connection.remote_static
            started = trio.current_time()
            await self._run_connection(connection, initiated_by_us=True)
            peer = self._peers.get(connection.remote_static)
            if peer is not None and peer.connected_since is not None and peer.connected_since >= started:
                backoff.succeeded()  # it worked: the next redial starts from the base delay
            backoff.failed(trio.current_time(), self._random)
        self._wakeup.set()

    # -- one connection -----------------------------------------------------------------

    @staticmethod
    def _suspect(peer: Peer) -> bool:
        connection = peer.connection
        return connection is not None and \
            trio.current_time() - connection.received_at > TIMERS.suspect_s

    def _keep(self, peer: Peer, initiated_by_us: bool) -> bool:
        """Whether a new connection replaces the existing one (both ends decide alike, or
        the existing one is suspect: silent for longer than a live peer stays quiet)."""
        if peer.connection is None or self._suspect(peer):
            return True
        own = self._daemon.identity.noise.public
        lower_is_us = own < peer.dh_key

        def initiated_by_lower(by_us: bool) -> bool:
            return by_us == lower_is_us

        return initiated_by_lower(initiated_by_us) and not initiated_by_lower(peer.initiated_by_us)

    async def _run_connection(self, connection: SecureConnection, *, initiated_by_us: bool) -> None:
        peer = self._peers.get(connection.remote_static)
        if peer is None:  # removed (perhaps while the handshake ran)
            notice = self._removal_notice(connection.remote_static)
            if notice:
                log.info("telling a removed device it was removed (%s)", short_key(connection.remote_static))
                with trio.move_on_after(NOTICE_TIMEOUT_S), contextlib.suppress(*CONNECTION_ERRORS):
                    await connection.send({"t": "circle.records", "records": notice})
            await connection.aclose("removed from the circle" if notice else "not a member of the circle")
            return
        if not self._keep(peer, initiated_by_us):
            await connection.aclose("duplicate connection")
            return
        if self._store_trouble.paused(trio.current_time()):
            # Our storage just failed: no session until the pause ends. Closed before any
            # message, so the peer does not count it as up and backs off too.
            peer.backoff.not_before = max(peer.backoff.not_before, self._store_trouble.until)
            await connection.aclose("local storage error")
            return
        if peer.connection is not None:
            self._end(peer, "duplicate connection")
        peer.connection = connection
        peer.initiated_by_us = initiated_by_us
        peer.confirmed = False
        reason = "closed"
        scope = trio.CancelScope()
        self._scopes[connection] = scope
        try:
            with scope:
                await converse(self._daemon, peer, connection,
                               arrived=lambda: self._arrived(peer, connection),
                               gossip=new_gossip(self._daemon))
        except (PeerClosed, StoreError, *CONNECTION_ERRORS, BaseExceptionGroup) as raised:
            err = single_connection_error(raised, lambda bugs: report_bug("peer", bugs))
            if isinstance(err, PeerClosed):
                reason = err.reason or "closed by peer"
            elif isinstance(err, StoreError):
                # Our disk, not the peer: nothing of its batch was committed, it resends later.
                # Sessions pause (with backoff) while it persists: see _run_connection.
                reason = "local storage error"
                now = trio.current_time()
                if self._store_trouble.failed(now):
                    log.error("sync with %s stopped: %s (sync paused %.0f s; repeats logged "
                              "at most once a minute)", peer.name, err, self._store_trouble.delay)
                else:
                    log.debug("sync with %s stopped: %s", peer.name, err)
                self._daemon.count_error("store")
            elif isinstance(err, ExceptionGroup):
                reason = "internal error"
                report_bug("peer", err)
            else:
                reason = f"{type(err).__name__}: {err}"
                quiet.warning(("conn", peer.sign_key, cause_of(err)),
                              "connection to %s ended: %s", peer.name, err)
                self._daemon.count_error(getattr(err, "reason", None) or type(err).__name__)
        except Exception as bug:  # a bug outside any nursery: it ends this connection only
            reason = "internal error"
            report_bug("peer", bug)
        finally:
            self._scopes.pop(connection, None)
            with trio.CancelScope(shield=True):
                await connection.aclose(self._close_reasons.pop(connection, reason))
            if peer.connection is connection:
                peer.connection = None
                peer.last_seen = time.time()
                peer.backoff.failed(trio.current_time(), self._random)
                if peer.confirmed:
                    peer.confirmed = False
                    log.info("disconnected from %s: %s", peer.name, reason)
                    self._daemon.peer_changed(peer, up=False, reason=reason)  # reads peer.sync
                peer.sync = None
                self._wakeup.set()

    def _confirm(self, peer: Peer, connection: SecureConnection) -> None:
        """The peer's first message arrived: it accepted us (an XX initiator cannot know
        earlier, since the responder checks our key only after the last handshake message)."""
        peer.confirmed = True
        peer.connected_since = trio.current_time()
        peer.last_seen = time.time()
        peer.backoff.succeeded()
        log.info("connected to %s (%s, %s)", peer.name, fingerprint(peer.sign_key),
                 remote_address(connection) or "unknown address")
        self._daemon.peer_changed(peer, up=True)

    def _arrived(self, peer: Peer, connection: SecureConnection) -> None:
        peer.last_seen = time.time()  # measured: the last message that arrived
        if not peer.confirmed and peer.connection is connection:
            self._confirm(peer, connection)
