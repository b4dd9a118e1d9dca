"""The daemon: owns this device's identity, store, circle and logs, and runs the services.

It is the one implementation of meshd.api.routes.DaemonControl: every door (the local API,
meshctl, the tests) goes through its methods. The work lives in the modules it wires
together: net/ (peers, discovery, logsync), relay/links.py (the relay path), pairing."""

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

from . import errors, sdnotify
from .api.batch import BatchRecord
from .api.events import EventBus
from .api.metrics import MeshdMetrics
from .api.routes import open_unix_listener, serve_api
from .api.unixsocket import socket_group_access
from .circleservice import CircleService
from .config import Config, ListenAddress
from .identity import DeviceIdentity, load_or_create_identity
from .net.logsync import LogService, checked_write
from .net.peers import Peer, PeerManager
from .net.presence import Presence
from .pairingservice import PairingService
from .protocol.circle import Circle, CircleState
from .protocol.crypto import RandomSource, short_key
from .protocol.discovery import short_device_id
from .protocol.records import CircleOperationError, DeviceInfo
from .sdnotify import listeners_from_systemd
from .store.db import Store, StoreError
from .store.purge import Purger

# Pairing (CPace, the word list), recovery and the relay path are imported where they are
# used: an idle daemon with no relay configured never runs them, and their modules are
# about a megabyte of its resident memory (bench/daemon.py, idle RSS).
if TYPE_CHECKING:
    from .relay.links import RelayLinks

log = logging.getLogger(__name__)

RELAYS_STATE_KEY = "relays"
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
        self.circles = CircleService(self.store, self.identity, lambda: self.device, rng, self.events,
                                     self.count_error)
        self.circles.subscribe(self._circle_changed)
        self.peer_manager = PeerManager(self, static_addresses=[(a.host or "127.0.0.1", a.port) for a in config.peers])
        self.discovery: Any = None
        self.relay_links: Any = None
        self.presence = Presence(self)
        self.pairing = PairingService(self)
        self.listen_addresses: list[str] = []
        self.listen_port = 0
        self._owns_socket = False
        self.started_at = time.time()
        self._nursery: trio.Nursery | None = None
        self._stopping = trio.Event()
        self.stopped = trio.Event()

    @property
    def nursery(self) -> trio.Nursery | None:
        """The daemon's nursery while it runs (pairing serves invitations in it)."""
        return self._nursery

    # -- circle ---------------------------------------------------------------------------

    @property
    def device(self) -> DeviceInfo:
        """This device as the circle sees it, carrying its self-signed claim."""
        info = DeviceInfo(self.identity.signing.public, self.identity.noise.public, self.config.device_name)
        return info.claimed(self.identity.signing)

    @property
    def circle(self) -> Circle:
        return self.circles.circle

    def is_author_allowed(self, sign_key: bytes) -> bool:
        return self.circles.may_author(sign_key)

    @property
    def is_member(self) -> bool:
        return self.circles.is_member

    def merge_circle_records(self, records: list[bytes], *, source: str) -> None:
        """Records from a peer or the relay; raises RecordRejected for an invalid one."""
        self.circles.merge(records, source=source)

    def adopt_circle(self, circle: Circle, source: str) -> None:
        self.circles.adopt(circle, source)

    def discovery_keys(self) -> list[bytes]:
        return self.circles.discovery_keys()

    def _circle_changed(self, before: CircleState, after: CircleState, source: str) -> None:
        """Subscribed to the circle service: the services follow every change."""
        if not after.is_member(self.identity.signing.public) and before.is_member(self.identity.signing.public):
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
            raise errors.InvalidArgument("invalid-argument", str(err)) from None
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

    # -- DaemonControl: pairing (meshd/pairingservice.py) ------------------------------------

    async def invite(self) -> dict[str, Any]:
        return await self.pairing.invite()

    async def join(self, code: str, address: str | None = None, relay: str | None = None) -> dict[str, Any]:
        return await self.pairing.join(code, address, relay)

    # -- DaemonControl: membership ---------------------------------------------------------------

    def require_member(self) -> None:
        if not self.is_member:
            raise errors.Conflict("not-a-member", "this device has been removed from its circle")

    async def _settle(self, device: str, words: list[str]) -> dict[str, Any]:
        """The recovery words remove a device, outranking what it did meanwhile (a thief that
        removed this device back): protocol/circle.md, "The recovery words outrank devices"."""
        from .protocol.recovery import RecoveryWordsError, recovery_member, words_to_seed
        from .protocol.removal import removed_devices
        try:
            signer, _, _ = recovery_member(words_to_seed(words))
        except RecoveryWordsError as err:
            raise errors.InvalidArgument("bad-words", str(err)) from None
        target = self._find_device(device, also=removed_devices(self.circle))
        before = self.circle.state
        try:
            self.circle.settle_with_recovery(signer, target.sign_key, self.rng)
        except CircleOperationError as err:
            raise errors.Conflict("refused", str(err)) from None
        log.warning("the recovery words removed device %r (%s)", target.name, short_key(target.sign_key))
        self.circles.changed(before, "the recovery words")
        if self.is_member and self.relay_links is None and (
                self.config.relays or self.store.get_state(RELAYS_STATE_KEY)):
            await self.start_relay_links()  # back in the circle: its relays again
        return {"removed": target.sign_key.hex(), "name": target.name, "member": self.is_member,
                "devices": self.devices()}

    def _find_device(self, text: str, also: Sequence[DeviceInfo] = ()) -> DeviceInfo:
        text = text.strip().lower()
        matches = [d for d in [*self.circle.state.devices(), *also]
                   if d.sign_key.hex().startswith(text) or _fingerprint(d.sign_key) == text
                   or d.name.lower() == text]
        if not matches:
            raise errors.NotFound("unknown-device", f"no device of this circle matches {text!r}; "
                           "see `meshctl devices`")
        if len(matches) > 1:
            raise errors.Conflict("ambiguous-device", f"{text!r} matches {len(matches)} devices; "
                           "use more of its id")
        return matches[0]

    async def remove(self, device: str, *, force: bool = False,
                     recovery_words: list[str] | None = None) -> dict[str, Any]:
        if recovery_words is not None:
            return await self._settle(device, recovery_words)
        self.require_member()
        target = self._find_device(device)
        before = self.circle.state
        if not force:
            if target.sign_key == bytes(self.identity.signing.public):
                raise errors.Conflict("needs-force", "this is the device you are using: removing it "
                               "locks it out of the circle; use --force if you mean it")
            if [d.sign_key for d in before.devices()] == [target.sign_key]:
                raise errors.Conflict("needs-force", "this is the circle's last device: removing it "
                               "leaves no device; use --force if you mean it")
        try:
            self.circle.remove_device(self.identity.signing, target.sign_key, self.rng, force=force)
        except CircleOperationError as err:
            raise errors.Conflict("refused", str(err)) from None
        if target.sign_key == bytes(self.identity.signing.public):
            # The others learn it now, before this device stops talking to them (later,
            # a member that dials it is handed the removal notice).
            with trio.move_on_after(SELF_REMOVAL_NOTICE_S):
                await self.peer_manager.tell_all({"t": "circle.records", "records": self.circle.records()})
                if self.relay_links is not None:
                    await self.relay_links.register_everywhere()
        self.circles.changed(before, "this device")
        return {"removed": target.sign_key.hex(), "fingerprint": _fingerprint(target.sign_key),
                "name": target.name,
                "epoch": self.circle.state.epoch_number}

    async def recovery_key(self) -> dict[str, Any]:
        self.require_member()
        from .protocol.recovery import generate_words, recovery_member, words_to_seed
        words = generate_words(self.rng)
        _, _, member = recovery_member(words_to_seed(words))
        before = self.circle.state
        old = before.recovery_members()
        self.circle.enrol_recovery(self.identity.signing, member, self.rng)
        self.circles.changed(before, "this device")
        return {"words": words, "replaced_previous": bool(old)}

    async def recover(self, words: list[str], relay: str, *, preview: bool = False,
                      readmit: list[str] | None = None) -> dict[str, Any]:
        from .protocol.recovery import RecoveryWordsError, words_to_seed
        from .relay import recovery as relayrecovery
        try:
            seed = words_to_seed(words)
        except RecoveryWordsError as err:
            raise errors.InvalidArgument("bad-words", str(err)) from None
        self.pairing.require_no_other_devices()
        remembered = self.store.get_state(RELAYS_STATE_KEY)
        known = [relay] if relay else []
        known += [*self.config.relays, *(msgpack.unpackb(remembered) if remembered else [])]
        addresses = list(dict.fromkeys(known))  # every relay it knows, the given one first
        result = await relayrecovery.recover(self, seed, addresses, preview=preview, readmit=readmit)
        if not preview:
            relay_links = await self.start_relay_links()
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
        relay_links = await self.start_relay_links()
        if relay_links is None:
            raise errors.Unavailable("no-relay", "relay support is not running")
        result = await relay_links.add(address)
        if share:
            from .relay import shared as relayset
            with self._store_errors():
                await relayset.publish(self.logs, address, use=True)
            result["shared"] = True
        return result

    async def remove_relay(self, address: str) -> dict[str, Any]:
        """Stop using a relay on every device of the circle (a relay of the config file stays)."""
        from .relay import shared as relayset
        address = address.strip()
        if address in self.config.relays:
            raise errors.Conflict("relay-in-config", f"{self.config.source or 'the configuration'} "
                           f"names the relay {address}: remove it there and restart meshd")
        if self.relay_links is None or not self.relay_links.uses(address):
            raise errors.NotFound("unknown-relay", f"this device does not use the relay {address}")
        result = self.relay_links.remove(address)
        with self._store_errors():
            await relayset.publish(self.logs, address, use=False)
        result["shared"] = True
        return result

    async def start_relay_links(self) -> RelayLinks | None:
        """The relay path, started with the first relay (configured, remembered or added).

        With no relay it has nothing to do, so a LAN-only daemon never loads it. Returns None
        when the daemon is not running.
        """
        if self.relay_links is None and self._nursery is not None:
            from .relay.links import RelayLinks
            # Set before it runs, so a concurrent caller uses this one (addresses it adds
            # meanwhile are linked when run() starts).
            self.relay_links = RelayLinks(self)
            await self._nursery.start(self.relay_links.run)
        relay_links: RelayLinks | None = self.relay_links
        return relay_links

    # -- DaemonControl: streams --------------------------------------------------------------------

    async def write(self, stream: str, record_id: str | None, body: bytes) -> dict[str, Any]:
        self.require_member()
        with self._store_errors():
            result = await self.logs.write(stream, record_id, body)
        self.metrics.entries.inc()
        return result

    async def write_batch(self, records: list[BatchRecord]) -> list[dict[str, Any]]:
        """Many records in one group commit: an answer per record, {"id", "seq"} or {"error"}.
        Records the log cannot hold are answered alone; the rest commit all or none."""
        from .protocol.log import OP_CODES, InvalidRequest
        self.require_member()
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
        self.require_member()
        with self._store_errors():
            return await self.logs.delete(stream, record_id)

    async def clear(self, stream: str) -> dict[str, Any]:
        self.require_member()
        with self._store_errors():
            return await self.logs.clear(stream)

    @contextlib.contextmanager
    def _store_errors(self) -> Iterator[None]:
        """An app's request that the store refused: a clear status, and nothing lost (the
        transaction rolled back; everything acknowledged before is intact)."""
        from .protocol.log import InvalidRequest
        from .store.db import StoreCorrupt, StoreFull, StoreReadOnly
        try:
            yield
        except InvalidRequest as err:
            raise errors.InvalidArgument("invalid-argument", str(err)) from None
        except StoreFull as err:
            self.count_error("store-full")
            log.error("write refused: %s", err)
            raise errors.StorageFull("storage-full", f"{err}; free some disk space and retry") from None
        except StoreReadOnly as err:
            self.count_error("store-read-only")
            log.error("write refused: %s", err)
            raise errors.Unavailable("storage-read-only", str(err)) from None
        except StoreCorrupt as err:
            self.count_error("store-corrupt")
            log.error("store error: %s", err)
            raise errors.StorageBroken("storage-corrupt", str(err)) from None

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
                    from .net.discovery import Discovery
                    self.discovery = Discovery(
                        interfaces=list(self.config.discovery.interfaces) or None, port=self.listen_port,
                        device_hint=short_device_id(self.identity.signing.public),
                        discovery_keys=self.discovery_keys, wall_clock=time.time,
                    )
                    await nursery.start(self._run_discovery)
                if self.is_member and (self.config.relays or self.store.get_state(RELAYS_STATE_KEY)):
                    await self.start_relay_links()
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
        from .relay import shared as relayset
        from .store.db import StoreError
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


def _fingerprint(sign_key: bytes) -> str:
    from .identity import fingerprint
    return fingerprint(sign_key)


def _format_address(sockname: tuple[Any, ...]) -> str:
    host, port = sockname[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

