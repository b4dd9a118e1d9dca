"""The daemon: owns this device's identity, store, circle and logs, and runs the services.

It is the one implementation of meshd.api.DaemonControl: every door (the local API, meshctl,
the tests) goes through its methods. The work itself lives in the modules it wires together:
peers (connections and sync), discovery (mDNS), relaylink (the relay path), pairing, logsync.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from . import sdnotify
from .api import ApiError, open_unix_listener, serve_api
from .apibatch import BatchRecord
from .apisocket import socket_group_access
from .config import Config, ListenAddress
from .containment import report_bug
from .events import EventBus
from .identity import DeviceIdentity, load_or_create_identity
from .logsync import LogService, checked_write
from .metrics import MeshdMetrics
from .peers import Peer, PeerManager
from .presence import Presence
from .protocol.circle import (
    ADD,
    Circle,
    CircleOperationError,
    DeviceInfo,
    Record,
    RecordRejected,
)
from .protocol.crypto import RandomSource, short_key
from .protocol.discovery import short_device_id
from .protocol.errors import ProtocolError
from .purge import Purger
from .sdnotify import listeners_from_systemd
from .store import Store, StoreError
from .transport import CONNECTION_ERRORS, PeerClosed

# Pairing (CPace, the word list), recovery and the relay path are imported where they are
# used: an idle daemon with no relay configured never runs them, and their modules are
# about a megabyte of its resident memory (bench/daemon.py, idle RSS).
if TYPE_CHECKING:
    from .pairing import Invitation
    from .relaylink import RelayLinks

log = logging.getLogger(__name__)

CIRCLE_STATE_KEY = "circle.records"
RELAYS_STATE_KEY = "relays"
JOIN_FIND_TIMEOUT_S = 15.0
# A device removing itself tells its peers and relays first, for at most this long.
SELF_REMOVAL_NOTICE_S = 5.0


class Daemon:
    def __init__(self, config: Config, *, rng: RandomSource = os.urandom) -> None:
        self.config = config
        self.rng = rng
        self.identity: DeviceIdentity = load_or_create_identity(config.state_dir, rng)
        self.store = Store(config.state_dir / "meshd.db")
        self.events = EventBus()
        self.metrics = MeshdMetrics()
        self.logs = LogService(self.store, self.identity.signing, lambda: int(time.time() * 1000))
        self.circle = self._load_circle()
        self.peer_manager = PeerManager(self, static_addresses=[(a.host or "127.0.0.1", a.port) for a in config.peers])
        self.discovery: Any = None
        self.relay_links: Any = None
        self.presence = Presence(self)
        self.invitations: dict[int, Invitation] = {}
        self.listen_addresses: list[str] = []
        self.listen_port = 0
        self._owns_socket = False
        self.started_at = time.time()
        self._nursery: trio.Nursery | None = None
        self._stopping = trio.Event()
        self.stopped = trio.Event()

    # -- circle ---------------------------------------------------------------------------

    @property
    def device(self) -> DeviceInfo:
        """This device as the circle sees it, carrying its self-signed claim."""
        info = DeviceInfo(self.identity.signing.public, self.identity.noise.public, self.config.device_name)
        return info.claimed(self.identity.signing)

    def _load_circle(self) -> Circle:
        saved = self.store.get_state(CIRCLE_STATE_KEY)
        if saved is not None:
            return Circle.from_records(msgpack.unpackb(saved))
        circle = Circle.create(self.identity.signing, self.device, self.rng)
        self._save_circle(circle)
        log.info("created a new circle %s with this device as its only member", short_key(circle.circle_id))
        return circle

    def _save_circle_or_log(self) -> None:
        from .store import StoreError
        try:
            self._save_circle(self.circle)
        except StoreError as err:
            # In memory the change holds; the records come back from peers or are saved with
            # the next change. Say so loudly: a restart before then forgets this change.
            log.error("could not save the circle's records: %s", err)
            self.count_error("store")
            self.events.publish("store.error", error=str(err))

    def _save_circle(self, circle: Circle) -> None:
        self.store.set_state(CIRCLE_STATE_KEY, msgpack.packb(circle.records(), use_bin_type=True))

    def is_author_allowed(self, sign_key: bytes) -> bool:
        """Entries are accepted from every device that is or was a member (history stays valid)."""
        state = self.circle.state
        return state.is_member(sign_key) or sign_key in state.removed

    @property
    def is_member(self) -> bool:
        return self.circle.state.is_member(self.identity.signing.public)

    def merge_circle_records(self, records: list[bytes], *, source: str) -> None:
        """Records from a peer or the relay; raises RecordRejected for an invalid one."""
        before = self.circle.state
        added = self.circle.merge(records)
        if added:
            self._circle_changed(before, source)

    def adopt_circle(self, circle: Circle, source: str) -> None:
        before = self.circle.state
        self.circle = circle
        self._circle_changed(before, source)

    def _circle_changed(self, before: Any, source: str) -> None:
        # Act on the change first (above all: drop removed devices), then save it; a full
        # disk must not leave a removed device connected.
        after = self.circle.state
        for key in after.members.keys() - before.members.keys():
            info = after.members[key]
            kind = "member.recovery_join" if self._is_recovery_join(key) else "member.added"
            if kind == "member.recovery_join":
                log.warning("RECOVERY: device %r (%s) joined the circle with the recovery key",
                            info.name, _fingerprint(key))
            else:
                log.info("device %r (%s) added to the circle (via %s)", info.name, _fingerprint(key), source)
            self.events.publish(kind, device=key.hex(), fingerprint=_fingerprint(key), name=info.name)
        for key in after.removed - before.removed:
            log.warning("device %s removed from the circle (via %s)", _fingerprint(key), source)
            self.events.publish("member.removed", device=key.hex(), fingerprint=_fingerprint(key))
        if after.epoch_record != before.epoch_record:  # a record, not a number, names an epoch
            self.events.publish("epoch", number=after.epoch_number)
        if not self.is_member and before.is_member(self.identity.signing.public):
            log.error("this device has been removed from the circle; it no longer syncs")
            if self.relay_links is not None:  # it dials no one (protocol/circle.md)
                self.relay_links.stop()
                self.relay_links = None
        self.peer_manager.sync_members()
        self.peer_manager.broadcast({"t": "circle.heads", "heads": list(self.circle.heads)})
        if self.relay_links is not None:
            self.relay_links.circle_changed()
        if self.discovery is not None:
            self.discovery.keys_changed()
        self._save_circle_or_log()
        if after.needs_rotation and self.is_member:
            self._rotate_epoch("an epoch key was sealed to a removed device")

    def _is_recovery_join(self, key: bytes) -> bool:
        """Whether the record that added `key` was signed by a recovery member (loud event)."""
        members = self.circle.state.members
        for encoded in self.circle.records():
            record = Record.decode(encoded)
            if record.kind == ADD and record.device is not None and record.device.sign_key == key:
                author = members.get(record.author)
                return author is not None and author.recovery
        return False

    def _rotate_epoch(self, why: str) -> None:
        log.info("starting a new epoch: %s", why)
        before = self.circle.state
        self.circle.rotate_epoch(self.identity.signing, self.rng)
        self._circle_changed(before, "this device")

    def discovery_keys(self) -> list[bytes]:
        """The current epoch's discovery key first, then the previous one (for late rotators)."""
        if not self.is_member:
            return []  # removed: it advertises nothing and recognises no one
        return [keys.discovery for keys in self.circle.recent_epochs(self.identity.noise, 2)]

    # -- events from the services -----------------------------------------------------------

    def peer_changed(self, peer: Peer, *, up: bool, reason: str = "") -> None:
        self.events.publish("peer.up" if up else "peer.down", device=peer.sign_key.hex(),
                            fingerprint=_fingerprint(peer.sign_key), name=peer.name, reason=reason)
        self._peers_gauge()
        if self.relay_links is not None:
            if not up and peer.sync is not None:
                own = bytes(self.identity.signing.public)
                self.relay_links.peer_synced(peer.sign_key, peer.sync.peer_confirmed.get(own, 0))
            self.relay_links.peers_changed()

    def count_error(self, kind: str) -> None:
        self.metrics.errors.inc(kind=kind)

    def _peers_gauge(self) -> None:
        self.presence.refresh()  # paths, meshd_peers{path}, STATUS=

    # -- DaemonControl: status ----------------------------------------------------------------

    def _names(self) -> dict[bytes, str]:
        """Names the devices chose after joining (names.py), over the circle records' names."""
        from .names import chosen_names
        try:
            return chosen_names(self.logs)
        except StoreError as err:
            log.warning("cannot read the devices' chosen names: %s", err)
            return {}

    def name_of(self, sign_key: bytes, names: dict[bytes, str] | None = None) -> str:
        chosen = (self._names() if names is None else names).get(sign_key)
        if chosen is not None:
            return chosen
        info = self.circle.state.members.get(sign_key)
        if info is not None:
            return str(info.name)
        return self.config.device_name if sign_key == self.identity.signing.public else "?"

    async def rename(self, name: str) -> dict[str, Any]:
        """This device's new name, for every device of the circle (names.py)."""
        from .names import BadName
        from .names import rename as write_name
        try:
            with self._store_errors():
                name = await write_name(self.logs, name)
        except BadName as err:
            raise ApiError(400, "invalid-argument", str(err)) from None
        log.info("this device is now called %r", name)
        return {"device": self.identity.signing.public.hex(), "fingerprint": self.identity.fingerprint,
                "name": name}

    def status(self) -> dict[str, Any]:
        state = self.circle.state
        return {
            "device": self.identity.signing.public.hex(),
            "fingerprint": self.identity.fingerprint,
            "name": self.name_of(self.identity.signing.public),
            "circle": state.circle_id.hex(),
            "member": self.is_member,
            "devices": len(state.devices()),
            "epoch": state.epoch_number,
            "listen": self.listen_addresses,
            "peers_connected": len(self.peer_manager.connected_sign_keys()),
            "relays": self.relays(),
            "relay_outbox": self.relay_links.outbox() if self.relay_links is not None else {},
            "uptime_s": round(time.time() - self.started_at, 1),
            "entries": sum(self.logs.version_vector().values()),
            "relay_backlog": self.relay_links.backlog() if self.relay_links is not None else 0,
        }

    def peers(self) -> list[dict[str, Any]]:
        self._peers_gauge()  # relay paths follow the relays' connections
        names = self._names()
        return [{**peer.describe(), "name": self.name_of(peer.sign_key, names),
                 "fingerprint": _fingerprint(peer.sign_key)} for peer in self.peer_manager.peers()]

    def devices(self) -> list[dict[str, Any]]:
        state = self.circle.state
        own = self.identity.signing.public
        connected = self.peer_manager.connected_sign_keys()
        names = self._names()
        return sorted((
            {"device": d.sign_key.hex(), "name": self.name_of(d.sign_key, names),
             "fingerprint": _fingerprint(d.sign_key),
             "this_device": d.sign_key == own, "connected": d.sign_key in connected}
            for d in state.devices()), key=lambda d: (d["name"], d["device"]))

    # -- DaemonControl: pairing ------------------------------------------------------------

    async def invite(self) -> dict[str, Any]:
        self._require_member()
        assert self._nursery is not None
        from .pairing import make_invitation
        invitation = make_invitation(self.rng, now=trio.current_time())
        host = self.config.listen.host or "0.0.0.0"
        try:  # the documented port, so a firewall can let pairing in
            listeners = await trio.open_tcp_listeners(self.config.pairing_port, host=host)
        except OSError as err:
            if self.config.pairing_port == 0:
                raise
            # Another invitation (or program) holds it: pair on any port rather than not at all.
            log.warning("pairing port %d is busy (%s); this invitation uses another port, which "
                        "a firewall may block", self.config.pairing_port, err.strerror)
            listeners = await trio.open_tcp_listeners(0, host=host)
        port = listeners[0].socket.getsockname()[1]
        self.invitations[invitation.nameplate] = invitation
        if self.discovery is not None:
            await self.discovery.advertise_invitation(invitation.nameplate, port)
        self._nursery.start_soon(self._serve_invitation, invitation, listeners)
        log.info("invitation %d open for %d s on port %d", invitation.nameplate,
                 int(invitation.expires_at - trio.current_time()), port)
        return {"code": invitation.code, "expires_in_s": int(invitation.expires_at - trio.current_time()),
                "port": port}

    async def _serve_invitation(self, invitation: Invitation, listeners: list[trio.SocketListener]) -> None:
        from .pairing import InvitationExpired, InvitationUsed, offer
        from .store import StoreError
        done = trio.Event()

        async def handle(stream: trio.abc.Stream) -> None:
            if invitation.used or done.is_set():
                await stream.aclose()
                return
            try:
                outcome = await offer(stream, invitation, self.identity.noise, self._welcome, rng=self.rng)
                self._paired(invitation, outcome, "lan")
            except (InvitationUsed, InvitationExpired) as err:
                log.warning("pairing attempt on invitation %d refused: %s", invitation.nameplate, err)
            except (ProtocolError, PeerClosed, StoreError, *CONNECTION_ERRORS) as err:
                log.warning("pairing attempt on invitation %d failed (the code is now burned): %s",
                            invitation.nameplate, err)
                self.count_error("pairing")
                self.events.publish("pair.failed", code=invitation.code, reason=getattr(err, "reason", "failed"))
            except Exception as bug:  # a bug ends this pairing attempt, not the daemon
                report_bug("connection", bug)
            finally:
                if invitation.used:
                    done.set()

        async def offer_at_relay(client: Any) -> None:
            from .protocol.relay import RelayError
            from .rendezvous import offer_via_relay
            try:
                outcome = await offer_via_relay(client, invitation, self.identity.noise, self._welcome,
                                                rng=self.rng)
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
                for client in (self.relay_links.connected_clients() if self.relay_links else []):
                    nursery.start_soon(offer_at_relay, client)
                await done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.invitations.pop(invitation.nameplate, None)
            for listener in listeners:
                await listener.aclose()
            if self.discovery is not None:
                with trio.CancelScope(shield=True):
                    await self.discovery.withdraw_invitation(invitation.nameplate)

    def _paired(self, invitation: Invitation, outcome: Any, path: str) -> None:
        device = self.circle.state.member_by_dh(outcome.remote_static)
        name = device.name if device else short_key(outcome.remote_static)
        log.info("pairing succeeded over %s: %r joined (check words: %s)", path, name, " ".join(outcome.sas))
        self.events.publish("pair.joined", code=invitation.code, name=name, sas=outcome.sas, path=path)

    async def _welcome(self, claim: bytes) -> dict[str, Any]:
        from .protocol.pairing import PairingRefused
        device = DeviceInfo.verify_claim(claim)
        before = self.circle.state
        known = self.circle.state.members.get(device.sign_key)
        if known is not None and known.dh_key == device.dh_key and not known.recovery:
            # Already added by an earlier pairing whose welcome never arrived: welcome again.
            log.info("device %r is already a member; sending the welcome again", device.name)
        else:
            try:
                self.circle.add_device(self.identity.signing, device, self.rng)
            except CircleOperationError as err:
                raise PairingRefused(str(err)) from None
        self._circle_changed(before, "pairing")
        return {"t": "pair.welcome", "records": self.circle.records(),
                "relays": [r["address"] for r in self.relays()],
                "inviter": self.identity.signing.public, "port": self.listen_port}

    async def join(self, code: str, address: str | None = None, relay: str | None = None) -> dict[str, Any]:
        from .pairing import join as pairing_join
        from .protocol.pairing import PairingError, parse_code
        try:
            nameplate, _ = parse_code(code)
        except PairingError as err:
            raise ApiError(400, "bad-code", str(err)) from None
        self._require_no_other_devices()
        candidates: list[tuple[str, int]]
        if address:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ApiError(400, "bad-address", f"{address!r} is not HOST:PORT")
            candidates = [(host.strip("[]"), int(port))]
        elif self.discovery is not None and relay is None:
            candidates = await self.discovery.find_invitation(nameplate, JOIN_FIND_TIMEOUT_S)
        else:
            candidates = []
        relays = [relay] if relay else [r["address"] for r in self.relays()]
        if not candidates and relays:
            return await self._join_via_relays(code, relays)
        if not candidates:
            raise ApiError(404, "invitation-not-found",
                           f"no device on this network offers invitation {nameplate}; check the code "
                           "and that both devices are on the same network")
        host, port = candidates[0]
        claim = self.device.claim(self.identity.signing)
        try:
            with trio.fail_after(JOIN_FIND_TIMEOUT_S):
                stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as err:
            # Nothing reached the inviter, so the code is unspent: the relays may still work.
            unreachable = f"cannot reach the inviting device at {host}:{port} ({err or 'timed out'})"
            if relays and not address:
                log.info("join: %s; trying the relays", unreachable)
                return await self._join_via_relays(code, relays, first_failure=unreachable)
            raise ApiError(504, "inviter-unreachable",
                           f"{unreachable}. The code was not used: try again, or join through a "
                           "relay (meshctl join CODE --relay HOST:PORT#KEY)") from None
        try:
            welcome, sas = await pairing_join(stream, code, self.identity.noise, claim)
        except PairingError as err:
            raise ApiError(403, getattr(err, "reason", "pairing-failed"), str(err)) from None
        except (ProtocolError, PeerClosed, *CONNECTION_ERRORS) as err:
            raise ApiError(502, "pairing-failed", _spent_maybe(err)) from None
        return await self._welcomed(welcome, sas, host)

    async def _join_via_relays(self, code: str, relays: list[str],
                               first_failure: str | None = None) -> dict[str, Any]:
        from .protocol.pairing import PairingError
        from .protocol.relay import RelayError
        from .rendezvous import join_via_relay
        claim = self.device.claim(self.identity.signing)
        failures = [first_failure] if first_failure else []
        for address in relays:
            try:
                welcome, sas = await join_via_relay(address, code, self.identity.noise, claim, rng=self.rng)
            except (RelayError, OSError, trio.TooSlowError) as err:
                failures.append(f"{address.split('#')[0]}: {err}")
                continue  # no-offer, or unreachable: the inviter may wait at another relay
            except ValueError as err:  # RelayAddressError
                raise ApiError(400, "bad-relay-address", str(err)) from None
            except PairingError as err:
                raise ApiError(403, getattr(err, "reason", "pairing-failed"), str(err)) from None
            except (ProtocolError, PeerClosed, *CONNECTION_ERRORS) as err:
                raise ApiError(502, "pairing-failed", _spent_maybe(err)) from None
            result = await self._welcomed(welcome, sas, None)
            await self.add_relay(address)
            return result
        raise ApiError(404, "invitation-not-found",
                       f"no device offers this invitation on this network or at a relay ({'; '.join(failures)})")

    def _require_no_other_devices(self) -> None:
        """Joining or recovering replaces this device's circle: only one it is alone in (or
        was removed from) may be left behind."""
        if self.is_member and len(self.circle.state.devices()) > 1:
            raise ApiError(409, "already-in-circle",
                           "this device already belongs to a circle with other devices; "
                           "remove it there first (meshctl remove, from another device)")

    async def _welcomed(self, welcome: dict[str, Any], sas: list[str], host: str | None) -> dict[str, Any]:
        if welcome.get("t") != "pair.welcome":
            raise ApiError(403, "pairing-refused", str(welcome.get("reason", "the inviter refused")))
        records, relays = welcome.get("records"), welcome.get("relays", [])
        if not isinstance(records, list) or not isinstance(relays, list):
            raise ApiError(502, "bad-welcome", "the inviter's welcome is malformed")
        try:
            circle = Circle.from_records(records)
        except RecordRejected as err:
            raise ApiError(502, "bad-welcome", f"the inviter sent an invalid circle: {err}") from None
        if not circle.state.is_member(self.identity.signing.public):
            raise ApiError(502, "bad-welcome", "the inviter's circle does not include this device")
        self._require_no_other_devices()  # checked again: the pairing took a while
        self.adopt_circle(circle, "pairing")
        for relay in relays:
            if isinstance(relay, str):
                try:
                    await self.add_relay(relay, share=False)  # the circle's list already has it
                except ApiError as err:  # joined anyway: a relay can be added later
                    log.warning("could not use the relay the inviter named: %s", err)
        # Dial the inviter at once on its main port rather than waiting for discovery.
        inviter_port = welcome.get("port")
        for peer in self.peer_manager.peers():
            if host and peer.sign_key == welcome.get("inviter") and isinstance(inviter_port, int):
                self.peer_manager.sighted(peer, [host], inviter_port)
        return {"circle": circle.circle_id.hex(), "sas": sas, "devices": self.devices()}

    # -- DaemonControl: membership ---------------------------------------------------------------

    def _require_member(self) -> None:
        if not self.is_member:
            raise ApiError(409, "not-a-member", "this device has been removed from its circle")

    async def _settle(self, device: str, words: list[str]) -> dict[str, Any]:
        """The recovery words remove a device, outranking what it did meanwhile (a thief that
        removed this device back): protocol/circle.md, "The recovery words outrank devices"."""
        from .protocol.recovery import RecoveryWordsError, recovery_member, words_to_seed
        from .protocol.removal import removed_devices
        try:
            signer, _, _ = recovery_member(words_to_seed(words))
        except RecoveryWordsError as err:
            raise ApiError(400, "bad-words", str(err)) from None
        target = self._find_device(device, also=removed_devices(self.circle))
        before = self.circle.state
        try:
            self.circle.settle_with_recovery(signer, target.sign_key, self.rng)
        except CircleOperationError as err:
            raise ApiError(409, "refused", str(err)) from None
        log.warning("the recovery words removed device %r (%s)", target.name, short_key(target.sign_key))
        self._circle_changed(before, "the recovery words")
        if self.is_member and self.relay_links is None and (
                self.config.relays or self.store.get_state(RELAYS_STATE_KEY)):
            await self._start_relay_links()  # back in the circle: its relays again
        return {"removed": target.sign_key.hex(), "name": target.name, "member": self.is_member,
                "devices": self.devices()}

    def _find_device(self, text: str, also: Sequence[DeviceInfo] = ()) -> DeviceInfo:
        text = text.strip().lower()
        matches = [d for d in [*self.circle.state.devices(), *also]
                   if d.sign_key.hex().startswith(text) or _fingerprint(d.sign_key) == text
                   or d.name.lower() == text]
        if not matches:
            raise ApiError(404, "unknown-device", f"no device of this circle matches {text!r}; "
                           "see `meshctl devices`")
        if len(matches) > 1:
            raise ApiError(409, "ambiguous-device", f"{text!r} matches {len(matches)} devices; "
                           "use more of its id")
        return matches[0]

    async def remove(self, device: str, *, force: bool = False,
                     recovery_words: list[str] | None = None) -> dict[str, Any]:
        if recovery_words is not None:
            return await self._settle(device, recovery_words)
        self._require_member()
        target = self._find_device(device)
        before = self.circle.state
        if not force:
            if target.sign_key == bytes(self.identity.signing.public):
                raise ApiError(409, "needs-force", "this is the device you are using: removing it "
                               "locks it out of the circle; use --force if you mean it")
            if [d.sign_key for d in before.devices()] == [target.sign_key]:
                raise ApiError(409, "needs-force", "this is the circle's last device: removing it "
                               "leaves no device; use --force if you mean it")
        try:
            self.circle.remove_device(self.identity.signing, target.sign_key, self.rng, force=force)
        except CircleOperationError as err:
            raise ApiError(409, "refused", str(err)) from None
        if target.sign_key == bytes(self.identity.signing.public):
            # The others learn it now, before this device stops talking to them (later,
            # a member that dials it is handed the removal notice).
            with trio.move_on_after(SELF_REMOVAL_NOTICE_S):
                await self.peer_manager.tell_all({"t": "circle.records", "records": self.circle.records()})
                if self.relay_links is not None:
                    await self.relay_links.register_everywhere()
        self._circle_changed(before, "this device")
        return {"removed": target.sign_key.hex(), "fingerprint": _fingerprint(target.sign_key),
                "name": target.name,
                "epoch": self.circle.state.epoch_number}

    async def recovery_key(self) -> dict[str, Any]:
        self._require_member()
        from .protocol.recovery import generate_words, recovery_member, words_to_seed
        words = generate_words(self.rng)
        _, _, member = recovery_member(words_to_seed(words))
        before = self.circle.state
        old = before.recovery_members()
        self.circle.enrol_recovery(self.identity.signing, member, self.rng)
        self._circle_changed(before, "this device")
        return {"words": words, "replaced_previous": bool(old)}

    async def recover(self, words: list[str], relay: str, *, preview: bool = False,
                      readmit: list[str] | None = None) -> dict[str, Any]:
        from . import relayrecovery
        from .protocol.recovery import RecoveryWordsError, words_to_seed
        try:
            seed = words_to_seed(words)
        except RecoveryWordsError as err:
            raise ApiError(400, "bad-words", str(err)) from None
        self._require_no_other_devices()
        remembered = self.store.get_state(RELAYS_STATE_KEY)
        known = [relay] if relay else []
        known += [*self.config.relays, *(msgpack.unpackb(remembered) if remembered else [])]
        addresses = list(dict.fromkeys(known))  # every relay it knows, the given one first
        result = await relayrecovery.recover(self, seed, addresses, preview=preview, readmit=readmit)
        if not preview:
            relay_links = await self._start_relay_links()
            if relay_links is not None and relay:
                await relay_links.add(relay)
        return result

    # -- DaemonControl: relays -------------------------------------------------------------------

    def relays(self) -> list[dict[str, Any]]:
        if self.relay_links is None:
            return [{"address": a, "connected": False} for a in self.config.relays]
        return self.relay_links.describe()

    async def add_relay(self, address: str, *, share: bool = True) -> dict[str, Any]:
        """Use a relay; share=True also tells every member of the circle (relayset.py)."""
        relay_links = await self._start_relay_links()
        if relay_links is None:
            raise ApiError(503, "no-relay", "relay support is not running")
        result = await relay_links.add(address)
        if share:
            from . import relayset
            with self._store_errors():
                await relayset.publish(self, address, use=True)
            result["shared"] = True
        return result

    async def remove_relay(self, address: str) -> dict[str, Any]:
        """Stop using a relay on every device of the circle (a relay of the config file stays)."""
        from . import relayset
        address = address.strip()
        if address in self.config.relays:
            raise ApiError(409, "relay-in-config", f"{self.config.source or 'the configuration'} "
                           f"names the relay {address}: remove it there and restart meshd")
        if self.relay_links is None or not self.relay_links.uses(address):
            raise ApiError(404, "unknown-relay", f"this device does not use the relay {address}")
        result = self.relay_links.remove(address)
        with self._store_errors():
            await relayset.publish(self, address, use=False)
        result["shared"] = True
        return result

    async def _start_relay_links(self) -> RelayLinks | None:
        """The relay path, started with the first relay (configured, remembered or added).

        With no relay it has nothing to do, so a LAN-only daemon never loads it. Returns None
        when the daemon is not running.
        """
        if self.relay_links is None and self._nursery is not None:
            from .relaylink import RelayLinks
            # Set before it runs, so a concurrent caller uses this one (addresses it adds
            # meanwhile are linked when run() starts).
            self.relay_links = RelayLinks(self)
            await self._nursery.start(self.relay_links.run)
        relay_links: RelayLinks | None = self.relay_links
        return relay_links

    # -- DaemonControl: streams --------------------------------------------------------------------

    async def write(self, stream: str, record_id: str | None, body: bytes) -> dict[str, Any]:
        self._require_member()
        with self._store_errors():
            result = await self.logs.write(stream, record_id, body)
        self.metrics.entries.inc()
        return result

    async def write_batch(self, records: list[BatchRecord]) -> list[dict[str, Any]]:
        """Many records in one group commit: an answer per record, {"id", "seq"} or {"error"}.
        Records the log cannot hold are answered alone; the rest commit all or none."""
        from .protocol.log import OP_CODES, InvalidRequest
        self._require_member()
        writes, answers = [], []
        for record in records:
            try:
                writes.append(checked_write(OP_CODES[record.op], record.stream, record.record_id,
                                            record.body))
                answers.append(None)
            except InvalidRequest as err:
                answers.append({"error": {"code": "invalid-argument", "message": str(err)}})
        written: list[tuple[str, int]] = []
        if writes:
            with self._store_errors():
                written = await self.logs.submit_ids(writes)
            self.metrics.entries.inc(len(writes))
        done = iter(written)
        return [answer or dict(zip(("id", "seq"), next(done), strict=True)) for answer in answers]

    def read(self, stream: str, after: str | None, limit: int) -> dict[str, Any]:
        with self._store_errors():
            return self.logs.read(stream, after=after, limit=limit)

    async def delete(self, stream: str, record_id: str) -> dict[str, Any]:
        self._require_member()
        with self._store_errors():
            return await self.logs.delete(stream, record_id)

    async def clear(self, stream: str) -> dict[str, Any]:
        self._require_member()
        with self._store_errors():
            return await self.logs.clear(stream)

    @contextlib.contextmanager
    def _store_errors(self) -> Iterator[None]:
        """An app's request that the store refused: a clear status, and nothing lost (the
        transaction rolled back; everything acknowledged before is intact)."""
        from .protocol.log import InvalidRequest
        from .store import StoreCorrupt, StoreFull, StoreReadOnly
        try:
            yield
        except InvalidRequest as err:
            raise ApiError(400, "invalid-argument", str(err)) from None
        except StoreFull as err:
            self.count_error("store-full")
            log.error("write refused: %s", err)
            raise ApiError(507, "storage-full", f"{err}; free some disk space and retry") from None
        except StoreReadOnly as err:
            self.count_error("store-read-only")
            log.error("write refused: %s", err)
            raise ApiError(503, "storage-read-only", str(err)) from None
        except StoreCorrupt as err:
            self.count_error("store-corrupt")
            log.error("store error: %s", err)
            raise ApiError(500, "storage-corrupt", str(err)) from None

    def streams(self) -> list[dict[str, Any]]:
        return self.logs.streams()

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listen: ListenAddress = self.config.listen
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        self.listen_addresses = [_format_address(listener.socket.getsockname()) for listener in listeners]
        self.listen_port = listeners[0].socket.getsockname()[1]
        api_listeners = listeners_from_systemd()
        if not api_listeners:
            api_listeners = [await open_unix_listener(
                self.config.socket_path, mode=0o660 if self.config.socket_group else 0o600,
                group=self.config.socket_group)]
            self._owns_socket = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.peer_manager.run, listeners)
                for api_listener in api_listeners:
                    await nursery.start(self._serve_api, api_listener)
                if self.config.discovery.enabled:
                    from .discovery import Discovery
                    self.discovery = Discovery(
                        interfaces=list(self.config.discovery.interfaces) or None, port=self.listen_port,
                        device_hint=short_device_id(self.identity.signing.public),
                        discovery_keys=self.discovery_keys, wall_clock=time.time,
                    )
                    await nursery.start(self._run_discovery)
                if self.is_member and (self.config.relays or self.store.get_state(RELAYS_STATE_KEY)):
                    await self._start_relay_links()
                nursery.start_soon(sdnotify.run_watchdog)
                nursery.start_soon(self._follow_shared_relays)
                nursery.start_soon(self._publish_commits)
                nursery.start_soon(Purger(self.store, self.logs.changed).run)
                log.info("meshd running: device %s, circle %s, listening on %s",
                         self.identity.fingerprint, short_key(self.circle.circle_id),
                         ", ".join(self.listen_addresses))
                sdnotify.ready(f"listening on {', '.join(self.listen_addresses)}")
                self.presence.ready()  # then STATUS= lines with the peers and relays
                task_status.started()
                await self._stopping.wait()
                sdnotify.stopping("closing connections")
                self.peer_manager.close_all("daemon stopping")
                nursery.cancel_scope.cancel()
        finally:
            self.store.close()
            self.stopped.set()
            if self._owns_socket:
                with contextlib.suppress(OSError):
                    os.unlink(self.config.socket_path)

    async def _publish_commits(self) -> None:
        """An `entries` event per author whenever commits (local or synced) extend its log."""
        seen = self.logs.changed.generation
        last = self.logs.version_vector()
        own = bytes(self.identity.signing.public)
        while True:
            seen = await self.logs.changed.wait(seen)
            vector = self.logs.version_vector()
            for author, seq in vector.items():
                before = last.get(author, 0)
                if seq > before:
                    if author != own:
                        self.metrics.entries.inc(seq - before)
                    self.events.publish("entries", author=author.hex(), first_seq=before + 1,
                                        last_seq=seq, local=author == own)
            last = vector

    def stop(self) -> None:
        self._stopping.set()

    async def _follow_shared_relays(self) -> None:
        from . import relayset
        from .store import StoreError
        try:
            await relayset.follow(self)
        except StoreError as err:  # the relay list stops following; sync goes on
            log.error("cannot follow the circle's relay list: %s", err)
            self.count_error("store")

    async def _serve_api(self, listener: trio.SocketListener, *, task_status: Any) -> None:
        # Members of the socket file's group (0660: meshd.socket's SocketGroup=, or
        # socket_group when meshd made the socket itself) may use the API too.
        gids: set[int] = set()
        if (gid := socket_group_access(listener)) is not None:
            gids.add(gid)
        if self.config.socket_group:
            try:
                gids.add(grp.getgrnam(self.config.socket_group).gr_gid)
            except KeyError:
                log.warning("socket group %r does not exist; only uid %d may use the API",
                            self.config.socket_group, os.getuid())
        await serve_api(self, listener, allowed_uids={os.getuid()}, allowed_gids=gids,
                        task_status=task_status)

    async def _run_discovery(self, *, task_status: Any) -> None:
        async with self.discovery:
            task_status.started()
            async for sighting in self.discovery.sightings:
                peer = self.peer_manager.peer_by_hint(sighting.tag_owner)
                if peer is not None:
                    self.peer_manager.sighted(peer, sighting.addresses, sighting.port)


def _spent_maybe(err: BaseException) -> str:
    """A pairing that failed after its first message left: whether the inviter received it
    (which spends the code) is unknowable here, so say exactly that."""
    return (f"pairing failed after contacting the inviting device ({err or type(err).__name__}). "
            "If the attempt reached it, the code is spent (`meshctl invite --wait` there says "
            "so): then ask for a new code; otherwise the same code works again")


def _fingerprint(sign_key: bytes) -> str:
    from .identity import fingerprint
    return fingerprint(sign_key)


def _format_address(sockname: tuple[Any, ...]) -> str:
    host, port = sockname[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

