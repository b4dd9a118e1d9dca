"""The daemon: owns this device's identity, store, circle and logs, and runs the services.

It is the one implementation of meshd.api.control.DaemonControl: every door (the local API,
meshctl, the tests) goes through its methods, most of which hand the call to a service. The
work lives in the modules it wires together: circleservice.py (the circle), pairingservice.py,
memberservice.py (removal, the recovery words), streamservice.py (the API's streams),
statusview.py (status, peers, devices), net/ (peers, discovery, logsync) and relay/links.py
(the relay path)."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
from .memberservice import RELAYS_STATE_KEY, MemberService
from .net.logsync import LogService
from .net.peers import Peer, PeerManager
from .net.presence import Presence
from .pairingservice import PairingService
from .protocol.circle import Circle, CircleState
from .protocol.crypto import RandomSource, short_key
from .protocol.discovery import short_device_id
from .protocol.gossip import heads_message
from .protocol.records import DeviceInfo
from .sdnotify import listeners_from_systemd
from .statusview import StatusView
from .store.db import Store, StoreError
from .store.purge import Purger
from .streamservice import StreamService, store_errors

# Pairing (CPace, the word list), recovery and the relay path are imported where they are
# used: an idle daemon with no relay configured never runs them, and their modules are
# about a megabyte of its resident memory (bench/daemon.py, idle RSS).
if TYPE_CHECKING:
    from .relay.links import RelayLinks

log = logging.getLogger(__name__)



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
        # A removed member's entries past its removal point never count (protocol/logs.md);
        # a removal that arrived before a crash took effect at the next start.
        self.logs.cutoff_of = lambda author: self.circles.circle.state.cutoffs.get(author)
        self.logs.apply_cutoffs(self.circles.circle.state.cutoffs)
        self.peer_manager = PeerManager(self, static_addresses=[(a.host or "127.0.0.1", a.port) for a in config.peers])
        self.discovery: Any = None
        self.relay_links: Any = None
        self.presence = Presence(self)
        self.pairing = PairingService(self)
        self.members = MemberService(self)
        self.view = StatusView(self)
        self.stream_service = StreamService(self)
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
        self.logs.circle_changed()  # who may author: the peers' vectors are rebuilt
        if not after.is_member(self.identity.signing.public) and before.is_member(self.identity.signing.public):
            log.error("this device has been removed from the circle; it no longer syncs")
            if self.relay_links is not None:  # it dials no one (protocol/circle.md)
                self.relay_links.stop()
                self.relay_links = None
        if after.cutoffs != before.cutoffs:  # drop what is past them (in the writer thread)
            self.logs.cutoffs_changed(after.cutoffs, self._nursery)
        self.peer_manager.sync_members()
        self.peer_manager.broadcast(heads_message(self.circle.heads))
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

    # -- DaemonControl: status (meshd/statusview.py) ---------------------------------------------

    async def rename(self, name: str) -> dict[str, Any]:
        """This device's new name, for every device of the circle (names.py)."""
        from .names import BadName
        from .names import rename as write_name
        try:
            with store_errors(self.count_error):
                name = await write_name(self.logs, name)
        except BadName as err:
            raise errors.InvalidArgument("invalid-argument", str(err)) from None
        log.info("this device is now called %r", name)
        return {"device": self.identity.signing.public.hex(), "fingerprint": self.identity.fingerprint,
                "name": name}

    def status(self) -> dict[str, Any]:
        return self.view.status()

    def peers(self) -> list[dict[str, Any]]:
        return self.view.peers()

    def devices(self) -> list[dict[str, Any]]:
        return self.view.devices()

    # -- DaemonControl: pairing (meshd/pairingservice.py) ------------------------------------

    async def invite(self) -> dict[str, Any]:
        return await self.pairing.invite()

    async def join(self, code: str, address: str | None = None, relay: str | None = None) -> dict[str, Any]:
        return await self.pairing.join(code, address, relay)

    # -- DaemonControl: membership (meshd/memberservice.py) ---------------------------------------

    def require_member(self) -> None:
        if not self.is_member:
            raise errors.Conflict("not-a-member", "this device has been removed from its circle")

    async def remove(self, device: str, *, force: bool = False, recovery_words: list[str] | None = None,
                     distrust_since_ms: int | None = None) -> dict[str, Any]:
        return await self.members.remove(device, force=force, recovery_words=recovery_words,
                                         distrust_since_ms=distrust_since_ms)

    async def recovery_key(self) -> dict[str, Any]:
        return await self.members.recovery_key()

    async def recover(self, words: list[str], relay: str, *, preview: bool = False,
                      readmit: list[str] | None = None) -> dict[str, Any]:
        return await self.members.recover(words, relay, preview=preview, readmit=readmit)

    # -- DaemonControl: relays -------------------------------------------------------------------

    def relays(self) -> list[dict[str, Any]]:
        if self.relay_links is None:
            return [{"address": a, "connected": False} for a in self.config.relays]
        return self.relay_links.describe()

    async def add_relay(self, address: str, *, share: bool = True,
                        token: bytes | None = None) -> dict[str, Any]:
        """Use a relay; share=True also tells every member of the circle (relayset.py) the
        address (never the enrolment token: that stays on this device), if the list has room."""
        from .relay import shared as relayset
        if share:
            relayset.check_room(self.logs, address)
        relay_links = await self.start_relay_links()
        if relay_links is None:
            raise errors.Unavailable("no-relay", "relay support is not running")
        result = await relay_links.add(address, token)
        if share:
            with store_errors(self.count_error):
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
        with store_errors(self.count_error):
            await relayset.publish(self.logs, address, use=False)
        result["shared"] = True
        return result

    async def start_relay_links(self) -> RelayLinks | None:
        """The relay path, started with the first relay (configured, remembered or added).
        With no relay it has nothing to do, so a LAN-only daemon never loads it. Returns None
        when the daemon is not running."""
        if self.relay_links is None and self._nursery is not None:
            from .relay.links import RelayLinks
            # Set before it runs, so a concurrent caller uses this one (addresses it adds
            # meanwhile are linked when run() starts).
            self.relay_links = RelayLinks(self)
            await self._nursery.start(self.relay_links.run)
        relay_links: RelayLinks | None = self.relay_links
        return relay_links

    # -- DaemonControl: streams (meshd/streamservice.py) --------------------------------------------

    async def write(self, stream: str, record_id: str | None, body: bytes) -> dict[str, Any]:
        return await self.stream_service.write(stream, record_id, body)

    async def write_batch(self, records: list[BatchRecord]) -> list[dict[str, Any]]:
        return await self.stream_service.write_batch(records)

    async def write_puts(self, stream: str, bodies: list[bytes]) -> list[tuple[str, int]] | None:
        return await self.stream_service.write_puts(stream, bodies)

    def read(self, stream: str, after: str | None, limit: int) -> dict[str, Any]:
        return self.stream_service.read(stream, after, limit)

    async def delete(self, stream: str, record_id: str) -> dict[str, Any]:
        return await self.stream_service.delete(stream, record_id)

    async def clear(self, stream: str) -> dict[str, Any]:
        return await self.stream_service.clear(stream)

    async def streams(self) -> list[dict[str, Any]]:
        return await self.stream_service.streams()

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
                self.logs.changed.listen(self._commits_publisher())
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

    def _commits_publisher(self) -> Callable[[], None]:
        """A listener of each commit (no task woken per commit): an `entries` event per author
        whose log (local or synced) it extended, `entries.dropped` when its log was cut back."""
        last = self.logs.version_vector()
        own = bytes(self.identity.signing.public)

        def publish() -> None:
            nonlocal last
            vector = self.logs.version_vector()
            for author, before in last.items():  # a removed member's, past its removal point
                if vector.get(author, 0) < before:
                    self.events.publish("entries.dropped", author=author.hex(), last_seq=vector.get(author, 0))
            for author, seq in vector.items():
                before = last.get(author, 0)
                if seq > before:
                    if author != own:
                        self.metrics.entries.inc(seq - before)
                    self.events.publish("entries", author=author.hex(), first_seq=before + 1,
                                        last_seq=seq, local=author == own)
            last = vector

        return publish

    def stop(self) -> None:
        self._stopping.set()

    async def _follow_shared_relays(self) -> None:
        from .relay import shared as relayset
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

