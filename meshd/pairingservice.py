"""Pairing orchestration: serving an invitation (on the LAN port and at each connected relay)
and joining with a code (the LAN, an address, or the relays), over the daemon's services.

The protocol is meshd/pairing.py's (offer, join) and protocol/pairing.py's; this module
decides where to offer and where to look, and what the circle does with a welcome. It never
imports the daemon: PairingHost is what it needs of it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import trio

from . import errors
from .circleservice import CircleService
from .config import Config
from .containment import report_bug
from .identity import DeviceIdentity
from .net.peers import PeerManager
from .net.transport import CONNECTION_ERRORS, PeerClosed
from .protocol.circle import Circle
from .protocol.crypto import RandomSource, short_key
from .protocol.errors import ProtocolError
from .protocol.records import CircleOperationError, DeviceInfo, RecordRejected

if TYPE_CHECKING:
    from .api.events import EventBus
    from .pairing import Invitation

log = logging.getLogger(__name__)

JOIN_FIND_TIMEOUT_S = 15.0


class PairingHost(Protocol):
    """What pairing needs of the daemon (the daemon passes itself)."""

    @property
    def config(self) -> Config: ...
    @property
    def identity(self) -> DeviceIdentity: ...
    @property
    def rng(self) -> RandomSource: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def circles(self) -> CircleService: ...
    @property
    def circle(self) -> Circle: ...
    @property
    def device(self) -> DeviceInfo: ...
    @property
    def is_member(self) -> bool: ...
    @property
    def discovery(self) -> Any: ...
    @property
    def relay_links(self) -> Any: ...
    @property
    def peer_manager(self) -> PeerManager: ...
    @property
    def listen_port(self) -> int: ...
    @property
    def nursery(self) -> trio.Nursery | None: ...
    def require_member(self) -> None: ...
    def count_error(self, kind: str) -> None: ...
    def relays(self) -> list[dict[str, Any]]: ...
    def devices(self) -> list[dict[str, Any]]: ...
    def adopt_circle(self, circle: Circle, source: str) -> None: ...
    async def add_relay(self, address: str, *, share: bool = True) -> dict[str, Any]: ...


async def _listen_on_one_port(port: int, host: str | None) -> list[trio.SocketListener]:
    """Listeners on host (every IPv4 and IPv6 address when None), all on the same port: the
    advert carries one. With port 0 the first gets one from the kernel and the others bind
    that port too; a family that cannot is left out (the first one still pairs)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    first, *others = listeners
    chosen = first.socket.getsockname()[1]
    same = [first]
    for listener in others:
        if listener.socket.getsockname()[1] == chosen:
            same.append(listener)
            continue
        address = listener.socket.getsockname()[0]
        await listener.aclose()
        try:
            same += await trio.open_tcp_listeners(chosen, host=address)
        except OSError as err:
            log.info("pairing: no listener on %s port %d (%s)", address, chosen, err.strerror)
    return same


class PairingService:
    def __init__(self, host: PairingHost) -> None:
        self._d = host
        self.invitations: dict[int, Invitation] = {}

    async def invite(self) -> dict[str, Any]:
        self._d.require_member()
        assert self._d.nursery is not None
        from .pairing import make_invitation
        invitation = make_invitation(self._d.rng, now=trio.current_time())
        host = self._d.config.listen.host  # None: every address, IPv4 and IPv6
        try:  # the documented port, so a firewall can let pairing in
            listeners = await _listen_on_one_port(self._d.config.pairing_port, host)
        except OSError as err:
            if self._d.config.pairing_port == 0:
                raise
            # Another invitation (or program) holds it: pair on any port rather than not at all.
            log.warning("pairing port %d is busy (%s); this invitation uses another port, which "
                        "a firewall may block", self._d.config.pairing_port, err.strerror)
            listeners = await _listen_on_one_port(0, host)
        port = listeners[0].socket.getsockname()[1]
        self.invitations[invitation.nameplate] = invitation
        if self._d.discovery is not None:
            await self._d.discovery.advertise_invitation(invitation.nameplate, port)
        self._d.nursery.start_soon(self._serve_invitation, invitation, listeners)
        log.info("invitation %d open for %d s on port %d", invitation.nameplate,
                 int(invitation.expires_at - trio.current_time()), port)
        return {"code": invitation.code, "expires_in_s": int(invitation.expires_at - trio.current_time()),
                "port": port}

    async def _serve_invitation(self, invitation: Invitation, listeners: list[trio.SocketListener]) -> None:
        from .pairing import InvitationExpired, InvitationUsed, offer
        from .store.db import StoreError
        done = trio.Event()

        async def handle(stream: trio.abc.Stream) -> None:
            if invitation.used or done.is_set():
                await stream.aclose()
                return
            try:
                outcome = await offer(stream, invitation, self._d.identity.noise, self._welcome, rng=self._d.rng)
                self._paired(invitation, outcome, "lan")
            except (InvitationUsed, InvitationExpired) as err:
                log.warning("pairing attempt on invitation %d refused: %s", invitation.nameplate, err)
            except (ProtocolError, PeerClosed, StoreError, *CONNECTION_ERRORS) as err:
                log.warning("pairing attempt on invitation %d failed (the code is now burned): %s",
                            invitation.nameplate, err)
                self._d.count_error("pairing")
                self._d.events.publish("pair.failed", code=invitation.code, reason=getattr(err, "reason", "failed"))
            except Exception as bug:  # a bug ends this pairing attempt, not the daemon
                report_bug("connection", bug)
            finally:
                if invitation.used:
                    done.set()

        async def offer_at_relay(client: Any) -> None:
            from .protocol.relay import RelayError
            from .relay.rendezvous import offer_via_relay
            try:
                outcome = await offer_via_relay(client, invitation, self._d.identity.noise, self._welcome,
                                                rng=self._d.rng)
                self._paired(invitation, outcome, f"relay {client.address}")
            except (InvitationUsed, InvitationExpired) as err:
                log.warning("pairing attempt on invitation %d refused: %s", invitation.nameplate, err)
            except (RelayError, ProtocolError, PeerClosed, StoreError, *CONNECTION_ERRORS) as err:
                log.warning("pairing through relay %s on invitation %d ended: %s", client.address,
                            invitation.nameplate, err)
            except Exception as bug:  # a bug ends this pairing attempt, not the daemon
                report_bug("connection", bug)
            finally:
                if invitation.used:
                    done.set()

        async def expire() -> None:
            await trio.sleep_until(invitation.expires_at)
            if not invitation.used:  # an attempt that started in time may finish
                done.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expire)
                nursery.start_soon(trio.serve_listeners, handle, listeners)
                # The same invitation waits at each relay too, for a device on another
                # network; whichever path is used first spends it.
                for client in (self._d.relay_links.connected_clients() if self._d.relay_links else []):
                    nursery.start_soon(offer_at_relay, client)
                await done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.invitations.pop(invitation.nameplate, None)
            for listener in listeners:
                await listener.aclose()
            if self._d.discovery is not None:
                with trio.CancelScope(shield=True):
                    await self._d.discovery.withdraw_invitation(invitation.nameplate)

    def _paired(self, invitation: Invitation, outcome: Any, path: str) -> None:
        device = self._d.circle.state.member_by_dh(outcome.remote_static)
        name = device.name if device else short_key(outcome.remote_static)
        log.info("pairing succeeded over %s: %r joined (check words: %s)", path, name, " ".join(outcome.sas))
        self._d.events.publish("pair.joined", code=invitation.code, name=name, sas=outcome.sas, path=path)

    async def _welcome(self, claim: bytes) -> dict[str, Any]:
        from .protocol.pairing import PairingRefused
        device = DeviceInfo.verify_claim(claim)
        before = self._d.circle.state
        known = self._d.circle.state.members.get(device.sign_key)
        if known is not None and known.dh_key == device.dh_key and not known.recovery:
            # Already added by an earlier pairing whose welcome never arrived: welcome again.
            log.info("device %r is already a member; sending the welcome again", device.name)
        else:
            try:
                self._d.circle.add_device(self._d.identity.signing, device, self._d.rng)
            except CircleOperationError as err:
                raise PairingRefused(str(err)) from None
        self._d.circles.changed(before, "pairing")
        return {"t": "pair.welcome", "records": self._d.circle.records(),
                "relays": [r["address"] for r in self._d.relays()],
                "inviter": self._d.identity.signing.public, "port": self._d.listen_port}

    async def join(self, code: str, address: str | None = None, relay: str | None = None) -> dict[str, Any]:
        from .pairing import join as pairing_join
        from .protocol.pairing import PairingError, parse_code
        try:
            nameplate, _ = parse_code(code)
        except PairingError as err:
            raise errors.InvalidArgument("bad-code", str(err)) from None
        self.require_no_other_devices()
        candidates: list[tuple[str, int]]
        if address:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise errors.InvalidArgument("bad-address", f"{address!r} is not HOST:PORT")
            candidates = [(host.strip("[]"), int(port))]
        elif self._d.discovery is not None and relay is None:
            candidates = await self._d.discovery.find_invitation(nameplate, JOIN_FIND_TIMEOUT_S)
        else:
            candidates = []
        relays = [relay] if relay else [r["address"] for r in self._d.relays()]
        if not candidates and relays:
            return await self._join_via_relays(code, relays)
        if not candidates:
            raise errors.NotFound("invitation-not-found",
                           f"no device on this network offers invitation {nameplate}; check the code "
                           "and that both devices are on the same network")
        host, port = candidates[0]
        claim = self._d.device.claim(self._d.identity.signing)
        try:
            with trio.fail_after(JOIN_FIND_TIMEOUT_S):
                stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as err:
            # Nothing reached the inviter, so the code is unspent: the relays may still work.
            unreachable = f"cannot reach the inviting device at {host}:{port} ({err or 'timed out'})"
            if relays and not address:
                log.info("join: %s; trying the relays", unreachable)
                return await self._join_via_relays(code, relays, first_failure=unreachable)
            raise errors.PeerTimeout("inviter-unreachable",
                           f"{unreachable}. The code was not used: try again, or join through a "
                           "relay (meshctl join CODE --relay HOST:PORT#KEY)") from None
        try:
            welcome, sas = await pairing_join(stream, code, self._d.identity.noise, claim)
        except PairingError as err:
            raise errors.Forbidden(getattr(err, "reason", "pairing-failed"), str(err)) from None
        except (ProtocolError, PeerClosed, *CONNECTION_ERRORS) as err:
            raise errors.PeerFailed("pairing-failed", _spent_maybe(err)) from None
        return await self._welcomed(welcome, sas, host)

    async def _join_via_relays(self, code: str, relays: list[str],
                               first_failure: str | None = None) -> dict[str, Any]:
        from .protocol.pairing import PairingError
        from .protocol.relay import RelayError
        from .relay.rendezvous import join_via_relay
        claim = self._d.device.claim(self._d.identity.signing)
        failures = [first_failure] if first_failure else []
        for address in relays:
            try:
                welcome, sas = await join_via_relay(address, code, self._d.identity.noise, claim, rng=self._d.rng)
            except (RelayError, OSError, trio.TooSlowError) as err:
                failures.append(f"{address.split('#')[0]}: {err}")
                continue  # no-offer, or unreachable: the inviter may wait at another relay
            except ValueError as err:  # RelayAddressError
                raise errors.InvalidArgument("bad-relay-address", str(err)) from None
            except PairingError as err:
                raise errors.Forbidden(getattr(err, "reason", "pairing-failed"), str(err)) from None
            except (ProtocolError, PeerClosed, *CONNECTION_ERRORS) as err:
                raise errors.PeerFailed("pairing-failed", _spent_maybe(err)) from None
            result = await self._welcomed(welcome, sas, None)
            try:
                await self._d.add_relay(address)
            except errors.Conflict:  # the circle shares as many relays as it uses: use it here
                await self._d.add_relay(address, share=False)
            return result
        raise errors.NotFound("invitation-not-found",
                       f"no device offers this invitation on this network or at a relay ({'; '.join(failures)})")

    def require_no_other_devices(self) -> None:
        """Joining or recovering replaces this device's circle: only one it is alone in (or
        was removed from) may be left behind."""
        if self._d.is_member and len(self._d.circle.state.devices()) > 1:
            raise errors.Conflict("already-in-circle",
                           "this device already belongs to a circle with other devices; "
                           "remove it there first (meshctl remove, from another device)")

    async def _welcomed(self, welcome: dict[str, Any], sas: list[str], host: str | None) -> dict[str, Any]:
        if welcome.get("t") != "pair.welcome":
            raise errors.Forbidden("pairing-refused", str(welcome.get("reason", "the inviter refused")))
        records, relays = welcome.get("records"), welcome.get("relays", [])
        if not isinstance(records, list) or not isinstance(relays, list):
            raise errors.PeerFailed("bad-welcome", "the inviter's welcome is malformed")
        try:
            circle = Circle.from_records(records)
        except RecordRejected as err:
            raise errors.PeerFailed("bad-welcome", f"the inviter sent an invalid circle: {err}") from None
        if not circle.state.is_member(self._d.identity.signing.public):
            raise errors.PeerFailed("bad-welcome", "the inviter's circle does not include this device")
        self.require_no_other_devices()  # checked again: the pairing took a while
        self._d.adopt_circle(circle, "pairing")
        for relay in relays:
            if isinstance(relay, str):
                try:
                    await self._d.add_relay(relay, share=False)  # the circle's list already has it
                except errors.Refusal as err:  # joined anyway: a relay can be added later
                    log.warning("could not use the relay the inviter named: %s", err)
        # Dial the inviter at once on its main port rather than waiting for discovery.
        inviter_port = welcome.get("port")
        for peer in self._d.peer_manager.peers():
            if host and peer.sign_key == welcome.get("inviter") and isinstance(inviter_port, int):
                self._d.peer_manager.sighted(peer, [host], inviter_port)
        return {"circle": circle.circle_id.hex(), "sas": sas, "devices": self._d.devices()}


def _spent_maybe(err: BaseException) -> str:
    """A pairing that failed after its first message left: whether the inviter received it
    (which spends the code) is unknowable here, so say exactly that."""
    return (f"pairing failed after contacting the inviting device ({err or type(err).__name__}). "
            "If the attempt reached it, the code is spent (`meshctl invite --wait` there says "
            "so): then ask for a new code; otherwise the same code works again")
