"""Private LAN discovery: the zeroconf bridge. The only module that imports zeroconf.

Theory of operation. python-zeroconf runs its own asyncio loop on its own thread, and its
ServiceBrowser calls handlers on yet another thread. None of that may touch trio state or
block the trio loop, so:

- every zeroconf call that can block (opening the sockets, register, unregister,
  resolve, browser cancel, close) runs in trio.to_thread.run_sync;
- browser callbacks do nothing but hand (generation, name, state) to the trio loop with
  TrioToken.run_sync_soon, which never blocks; on the trio side the event goes into a
  bounded memory channel, and a flood is dropped (quietly logged) instead of queued
  without bound;
- a few resolver tasks turn names into ServiceInfo (from zeroconf's cache, else one bounded
  query), recognise adverts with meshd.protocol.discovery and feed sightings.py.
- mDNS runs over IPv4 and IPv6 (lanaddress.py chooses the addresses and interfaces).

One maintenance task owns the advert. Every ADDRESS_POLL_S seconds, and at each window
boundary of the wall clock passed in, it compares (addresses, window, advertising key)
with what is on the air: a new window or key swaps in a fresh advert (register the new
one, then send goodbyes for the old); a change of the selected addresses restarts the
zeroconf engine on the new interface set (zeroconf binds its sockets per address).
Polling, rather than sleeping until the boundary, also copes with a suspended laptop,
whose monotonic clock stood still while the wall clock moved on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import trio
from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from ..protocol.crypto import RandomSource
from ..protocol.discovery import (
    PAIRING_SERVICE_TYPE,
    SERVICE_TYPE,
    Advert,
    invitation_nameplate,
    make_advert,
    make_invitation_advert,
    next_window_start,
    recognise,
    window_of,
)
from ..quietlog import QuietLogger
from .lanaddress import (
    AddressSource,
    advertised,
    dial_order,
    ipv4_only,
    mdns_interfaces,
    select_addresses,
    system_addresses,
)
from .sightings import Sighting, SightingFeed, offer

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

ADDRESS_POLL_S = 10.0
RESOLVE_TIMEOUT_MS = 1500
RESOLVERS = 4
REGISTER_TIMEOUT_S = 5.0
BROWSE_EVENTS_BUFFER = 256


class _Engine:
    """One Zeroconf instance bound to one set of addresses (IPv4 addresses and IPv6
    interfaces: lanaddress.py). Every method blocks: call it from a worker thread."""

    def __init__(self, addresses: tuple[str, ...], generation: int, v4: bool = False) -> None:
        self.addresses, self.generation = addresses, generation
        bind = ipv4_only(addresses) if v4 else addresses
        self.zc = Zeroconf(interfaces=mdns_interfaces(bind), use_asyncio=False)
        self.browsers: list[ServiceBrowser] = []
        self._announcing: set[Any] = set()

    def register(self, info: ServiceInfo) -> None:
        # Names are 50 random bits, so the RFC 6762 probe (which costs ~1 s) is skipped; and
        # we return once the service is in the registry rather than after the three
        # announcements (another ~0.5 s), which zeroconf's loop goes on sending by itself.
        assert self.zc.loop is not None
        registering = self.zc.async_register_service(info, cooperating_responders=True)
        future = asyncio.run_coroutine_threadsafe(registering, self.zc.loop)
        announcing = future.result(REGISTER_TIMEOUT_S)
        # asyncio holds tasks weakly: keep the announcing task alive until it is done.
        self._announcing = {task for task in self._announcing if not task.done()}
        self._announcing.add(announcing)

    def unregister(self, info: ServiceInfo) -> None:
        self.zc.unregister_service(info)

    def browse(self, service_type: str, handler: Callable[..., None]) -> ServiceBrowser:
        browser = ServiceBrowser(self.zc, service_type, handlers=[handler])
        self.browsers.append(browser)
        return browser

    def stop_browsing(self, browser: ServiceBrowser) -> None:
        browser.cancel()
        if browser in self.browsers:
            self.browsers.remove(browser)

    def resolve(self, service_type: str, name: str) -> ServiceInfo | None:
        return self.zc.get_service_info(service_type, name, timeout=RESOLVE_TIMEOUT_MS)

    def close(self) -> None:
        for browser in list(self.browsers):
            browser.cancel()
        if self.zc.loop is not None:  # no announcement may follow the goodbye below
            for task in self._announcing:
                self.zc.loop.call_soon_threadsafe(task.cancel)
        self.zc.close()  # sends goodbyes for everything still registered


def _service_info(service_type: str, instance: str, host: str, port: int,
                  txt: dict[str, str], addresses: tuple[str, ...]) -> ServiceInfo:
    return ServiceInfo(
        service_type,
        f"{instance}.{service_type}",
        port=port,
        properties=txt,
        server=host,
        parsed_addresses=advertised(addresses),
    )


class Discovery:
    """Advertise this device to its circle and report circle devices seen on the LAN.

    Use as `async with Discovery(...) as discovery:`; when the block is entered the first
    advert is on the air (if there is an address to use and a discovery key). Sightings
    arrive on `discovery.sightings`. discovery_keys() returns the circle's current discovery
    keys, the first being the one to advertise with; an empty list advertises nothing (a
    device not yet in a circle can still use the invitation calls).
    """

    def __init__(
        self,
        *,
        interfaces: list[str] | None,
        port: int,
        device_hint: bytes,
        discovery_keys: Callable[[], list[bytes]],
        wall_clock: Callable[[], float],
        rng: RandomSource = os.urandom,
        addresses: AddressSource = system_addresses,
        poll_interval: float = ADDRESS_POLL_S,
    ) -> None:
        self._allow = list(interfaces) if interfaces else None
        self._port, self._hint, self._keys = port, device_hint, discovery_keys
        self._wall_clock, self._rng = wall_clock, rng
        self._address_source, self._poll_interval = addresses, poll_interval
        self._keys_changed = trio.Event()
        self._names: set[str] = set()  # every service of our type on the air, for a rescan
        self._feed = SightingFeed()
        self.sightings = self._feed.receive
        self._send_event, self._receive_event = trio.open_memory_channel[tuple[int, str, str]](
            BROWSE_EVENTS_BUFFER
        )
        self._engine: _Engine | None = None
        self._generation = 0
        self._advert: tuple[tuple[int, bytes], Advert, ServiceInfo] | None = None
        self._invitations: dict[int, ServiceInfo] = {}
        self._resolve_limiter = trio.CapacityLimiter(RESOLVERS)
        self._engine_lock = trio.Lock()
        self._nursery_manager: Any = None
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        # For status and metrics: adverts put on the air; adverts resolved, by verdict.
        self.readvertised = 0
        self.seen = {"member": 0, "own": 0, "stranger": 0}

    # ---- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Discovery:
        self._token = trio.lowlevel.current_trio_token()
        await self._refresh()
        self._nursery_manager = trio.open_nursery()
        nursery = self._nursery = await self._nursery_manager.__aenter__()
        nursery.start_soon(self._maintain)
        for _ in range(RESOLVERS):
            nursery.start_soon(self._resolve_loop)
        return self

    async def __aexit__(self, *exc_info: object) -> bool | None:
        manager, self._nursery_manager = self._nursery_manager, None
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()  # the tasks run forever; the owner is leaving
        try:
            return bool(await manager.__aexit__(*exc_info))
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_engine()
                await self._feed.aclose()

    async def _stop_engine(self) -> None:
        engine, self._engine = self._engine, None
        self._advert = None
        self._feed.clear()
        if engine is not None:
            await trio.to_thread.run_sync(engine.close)

    # ---- the advert ---------------------------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            now = self._wall_clock()
            with trio.move_on_after(max(0.0, min(self._poll_interval, next_window_start(now) - now))):
                await self._keys_changed.wait()
            rescan = self._keys_changed.is_set()
            self._keys_changed = trio.Event()
            await self._refresh()
            if rescan and self._engine is not None:
                # Adverts dismissed as strangers may be our circle's under the new key.
                for name in list(self._names):
                    self._deliver(self._engine.generation, name, "Updated")

    def keys_changed(self) -> None:
        """The circle's discovery keys changed (joined a circle, new epoch): re-advertise
        now and look again at every advert on the air."""
        self._keys_changed.set()

    async def _refresh(self) -> None:
        """Make what is on the air match the current addresses, window and key."""
        async with self._engine_lock:
            addresses = select_addresses(self._address_source(), self._allow)
            if self._engine is None or self._engine.addresses != addresses:
                await self._restart_engine(addresses)
            if self._engine is not None:
                await self._update_advert(self._engine)

    async def _restart_engine(self, addresses: tuple[str, ...]) -> None:
        await self._stop_engine()
        if not addresses:
            quiet.warning("no-addresses", "discovery: no usable interface address; waiting")
            return
        self._generation += 1
        try:
            engine = await trio.to_thread.run_sync(_Engine, addresses, self._generation)
        except OSError as err:
            quiet.warning(("open", addresses), "discovery: cannot open mDNS on %s: %s",
                          ",".join(addresses), err)
            if ipv4_only(addresses) in ((), addresses):
                return
            try:  # IPv6 multicast may fail where IPv4 works: keep IPv4 then
                engine = await trio.to_thread.run_sync(_Engine, addresses, self._generation, True)
            except OSError:
                return
        log.info("discovery: mDNS on %s", ",".join(addresses))
        self._engine = engine
        handler = self._browse_handler(engine.generation)
        await trio.to_thread.run_sync(engine.browse, SERVICE_TYPE, handler)
        for nameplate, info in list(self._invitations.items()):
            self._invitations[nameplate] = await self._register_invitation(engine, info)

    async def _update_advert(self, engine: _Engine) -> None:
        keys = self._keys()
        window = window_of(self._wall_clock())
        wanted = (window, keys[0]) if keys else None
        current = self._advert
        if current is not None and current[0] == wanted:
            return
        self._advert = None
        if wanted is not None:
            advert = make_advert(wanted[1], window, self._hint, self._rng)
            info = _service_info(SERVICE_TYPE, advert.instance, advert.host, self._port,
                                 dict(advert.txt), engine.addresses)
            await trio.to_thread.run_sync(engine.register, info)
            self._advert = (wanted, advert, info)
            self.readvertised += 1
            log.debug("discovery: advertising for window %d", window)
        if current is not None:
            await trio.to_thread.run_sync(engine.unregister, current[2])

    @property
    def advert(self) -> Advert | None:
        """The advert on the air now (None when there is none)."""
        return self._advert[1] if self._advert else None

    # ---- browsing -----------------------------------------------------------------------

    def _browse_handler(self, generation: int) -> Callable[..., None]:
        token = self._token
        assert token is not None

        def on_service_state_change(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            # On zeroconf's browser thread: hand over and return at once.
            try:
                token.run_sync_soon(self._deliver, generation, name, state_change.name)
            except trio.RunFinishedError:
                pass

        return on_service_state_change

    def _deliver(self, generation: int, name: str, state: str) -> None:
        try:
            self._send_event.send_nowait((generation, name, state))
        except trio.WouldBlock:
            quiet.warning("browse-flood", "discovery: too many mDNS services; dropping some")
        except trio.ClosedResourceError:
            pass

    async def _resolve_loop(self) -> None:
        async for generation, name, state in self._receive_event:
            engine = self._engine
            if engine is None or engine.generation != generation:
                continue  # from an engine since replaced
            if state == "Removed":
                self._names.discard(name)
                self._feed.forget(name)
                continue
            self._names.add(name)
            info = await trio.to_thread.run_sync(
                engine.resolve, SERVICE_TYPE, name,
                abandon_on_cancel=True, limiter=self._resolve_limiter,
            )
            if info is None or engine is not self._engine or name not in self._names:
                continue
            hint = recognise(info.properties, self._keys(), window_of(self._wall_clock()))
            if hint is None or not info.port:
                self.seen["stranger"] += 1
                continue
            if hint == self._hint:
                self.seen["own"] += 1
                continue
            self.seen["member"] += 1
            # A link-local IPv6 address comes scoped with the interface it was heard on.
            addresses = dial_order(info.parsed_scoped_addresses())
            self._feed.seen(name, Sighting(hint, addresses, info.port))

    # ---- invitations (pairing on the LAN) -----------------------------------------------

    async def _register_invitation(self, engine: _Engine, template: ServiceInfo) -> ServiceInfo:
        info = ServiceInfo(
            PAIRING_SERVICE_TYPE, template.name, port=template.port,
            properties=template.properties, server=template.server,
            parsed_addresses=advertised(engine.addresses),
        )
        await trio.to_thread.run_sync(engine.register, info)
        return info

    async def advertise_invitation(self, nameplate: int, port: int) -> None:
        """Announce an open invitation (only its nameplate) until withdraw_invitation()."""
        await self.withdraw_invitation(nameplate)
        advert = make_invitation_advert(nameplate, self._rng)
        async with self._engine_lock:
            engine = self._engine
            addresses = engine.addresses if engine else ()
            info = _service_info(PAIRING_SERVICE_TYPE, advert.instance, advert.host, port,
                                 dict(advert.txt), addresses)
            if engine is not None:
                info = await self._register_invitation(engine, info)
            self._invitations[nameplate] = info

    async def withdraw_invitation(self, nameplate: int) -> None:
        async with self._engine_lock:
            info = self._invitations.pop(nameplate, None)
            if info is not None and self._engine is not None:
                await trio.to_thread.run_sync(self._engine.unregister, info)

    # The timeout parameter is the shared interface the daemon is written against.
    async def find_invitation(self, nameplate: int, timeout: float) -> list[tuple[str, int]]:  # noqa: ASYNC109
        """Addresses of an inviter on the LAN offering this nameplate; [] after timeout."""
        engine = self._engine
        if engine is None:
            return []
        token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[str](BROWSE_EVENTS_BUFFER)

        def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                      state_change: ServiceStateChange) -> None:
            if state_change is not ServiceStateChange.Removed:
                try:
                    token.run_sync_soon(offer, send, name)
                except trio.RunFinishedError:
                    pass

        browser = await trio.to_thread.run_sync(engine.browse, PAIRING_SERVICE_TYPE, on_change)
        try:
            with trio.move_on_after(timeout):
                async for name in receive:
                    info = await trio.to_thread.run_sync(
                        engine.resolve, PAIRING_SERVICE_TYPE, name, abandon_on_cancel=True
                    )
                    if info is not None and info.port and \
                            invitation_nameplate(info.properties) == nameplate:
                        return [(address, info.port)
                                for address in dial_order(info.parsed_scoped_addresses())]
            return []
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(engine.stop_browsing, browser)

