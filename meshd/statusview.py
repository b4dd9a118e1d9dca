"""What the daemon tells about itself and the circle: GET /v1/status, /v1/peers and
/v1/devices, with each device's chosen name (names.py). Reads only.

It never imports the daemon: StatusHost is what it needs of it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from .config import Config
from .identity import DeviceIdentity, fingerprint
from .net.logsync import LogService
from .net.peers import PeerManager
from .net.presence import Presence
from .protocol.circle import Circle
from .store.db import Store, StoreError

log = logging.getLogger(__name__)


class StatusHost(Protocol):
    """What the status views need of the daemon (the daemon passes itself)."""

    @property
    def config(self) -> Config: ...
    @property
    def identity(self) -> DeviceIdentity: ...
    @property
    def logs(self) -> LogService: ...
    @property
    def circle(self) -> Circle: ...
    @property
    def is_member(self) -> bool: ...
    @property
    def peer_manager(self) -> PeerManager: ...
    @property
    def presence(self) -> Presence: ...
    @property
    def relay_links(self) -> Any: ...
    @property
    def listen_addresses(self) -> list[str]: ...
    @property
    def started_at(self) -> float: ...
    def relays(self) -> list[dict[str, Any]]: ...


class StatusView:
    def __init__(self, host: StatusHost) -> None:
        self._d = host
        self._names: tuple[Store, int, dict[bytes, str]] | None = None  # (store, its changes, names())

    def names(self) -> dict[bytes, str]:
        """Names the devices chose after joining (names.py), over the circle records' names.
        Read again only after a commit changed their stream (Store.stream_changes): the
        stream holds whatever the circle wrote there, and reading it whole at every status,
        devices and peers request held the event loop in proportion (review s9)."""
        from . import names
        store = self._d.logs.store
        changes = store.stream_changes(names.NAMES_STREAM)  # (before the read)
        if self._names is not None and self._names[0] is store and self._names[1] == changes:
            return self._names[2]
        try:
            chosen = names.chosen_names(self._d.logs)
        except StoreError as err:
            log.warning("cannot read the devices' chosen names: %s", err)
            return {}
        self._names = (store, changes, chosen)
        return chosen

    def name_of(self, sign_key: bytes, names: dict[bytes, str] | None = None) -> str:
        chosen = (self.names() if names is None else names).get(sign_key)
        if chosen is not None:
            return chosen
        info = self._d.circle.state.members.get(sign_key)
        if info is not None:
            return str(info.name)
        return self._d.config.device_name if sign_key == self._d.identity.signing.public else "?"

    def status(self) -> dict[str, Any]:
        d = self._d
        state = d.circle.state
        links = d.relay_links
        return {
            "device": d.identity.signing.public.hex(),
            "fingerprint": d.identity.fingerprint,
            "name": self.name_of(d.identity.signing.public),
            "circle": state.circle_id.hex(),
            "member": d.is_member,
            "devices": len(state.devices()),
            "epoch": state.epoch_number,
            "listen": d.listen_addresses,
            "peers_connected": len(d.peer_manager.connected_sign_keys()),
            "relays": d.relays(),
            "relay_outbox": links.outbox() if links is not None else {},
            "uptime_s": round(time.time() - d.started_at, 1),
            "entries": sum(d.logs.version_vector().values()),
            "relay_backlog": links.backlog() if links is not None else 0,
        }

    def peers(self) -> list[dict[str, Any]]:
        self._d.presence.refresh()  # relay paths follow the relays' connections
        names = self.names()
        return [{**peer.describe(), "name": self.name_of(peer.sign_key, names),
                 "fingerprint": fingerprint(peer.sign_key)} for peer in self._d.peer_manager.peers()]

    def devices(self) -> list[dict[str, Any]]:
        state = self._d.circle.state
        own = self._d.identity.signing.public
        connected = self._d.peer_manager.connected_sign_keys()
        names = self.names()
        return sorted((
            {"device": d.sign_key.hex(), "name": self.name_of(d.sign_key, names),
             "fingerprint": fingerprint(d.sign_key),
             "this_device": d.sign_key == own, "connected": d.sign_key in connected}
            for d in state.devices()), key=lambda d: (d["name"], d["device"]))
