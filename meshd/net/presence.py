"""How the other devices are reached, for peers, metrics and systemd's STATUS= line.

A device is on the "lan" path while a confirmed direct channel to it is up, and on the
"relay" path while the relay that delivered its last verified letter is connected (a letter
proves the device writes there now; the relay's connection proves we still read there).
Every change that can move a path (a peer up or down, a letter, a relay session starting or
ending) calls refresh(), which also sends a new STATUS= line to systemd when it changed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from .. import sdnotify

if TYPE_CHECKING:
    from ..api.events import EventBus
    from ..api.metrics import MeshdMetrics
    from ..protocol.circle import Circle
    from ..relay.links import RelayLinks
    from .peers import PeerManager


class PresenceHost(Protocol):
    """What presence reads of the daemon (this module never imports it)."""

    @property
    def peer_manager(self) -> PeerManager: ...
    @property
    def relay_links(self) -> RelayLinks | None: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def metrics(self) -> MeshdMetrics: ...
    @property
    def circle(self) -> Circle: ...
    @property
    def is_member(self) -> bool: ...
    @property
    def listen_addresses(self) -> list[str]: ...


class Presence:
    def __init__(self, daemon: PresenceHost) -> None:
        self._daemon = daemon
        self._relay_letters: dict[bytes, str] = {}  # sign key -> relay its last letter came through
        self._status_line: str | None = None  # the last STATUS= sent; None until ready

    def ready(self) -> None:
        """The daemon told systemd READY=1: from now on, STATUS= follows the peers."""
        self._status_line = ""
        self.refresh()

    def relay_letter(self, sender: bytes, relay: str) -> None:
        """A verified letter from sender arrived through relay."""
        self._relay_letters[sender] = relay
        for peer in self._daemon.peer_manager.peers():
            if peer.sign_key == sender:
                peer.last_seen = time.time()
        self.refresh()

    def relay_connection_changed(self, relay: str, *, up: bool) -> None:
        self._daemon.events.publish("relay.up" if up else "relay.down", relay=relay)
        self.refresh()

    def refresh(self) -> None:
        daemon = self._daemon
        links = daemon.relay_links
        connected = {str(c.address) for c in links.connected_clients()} if links is not None else set()
        counts = {"lan": 0, "relay": 0}
        for peer in daemon.peer_manager.peers():
            peer.relay_reachable = self._relay_letters.get(peer.sign_key) in connected
            if peer.path is not None:
                counts[peer.path] += 1
        for path, count in counts.items():
            daemon.metrics.peers.set(count, path=path)
        self._notify_status(counts, len(connected), len(links.describe()) if links is not None else 0)

    def _notify_status(self, counts: dict[str, int], relays_up: int, relays: int) -> None:
        daemon = self._daemon
        if not daemon.is_member:
            text = "removed from its circle: not syncing"
        else:
            others = max(0, len(daemon.circle.state.devices()) - 1)
            text = (f"listening on {', '.join(daemon.listen_addresses)}; "
                    f"{counts['lan'] + counts['relay']} of {others} other devices reachable "
                    f"({counts['lan']} lan, {counts['relay']} relay)")
            if relays:
                text += f"; relays {relays_up}/{relays} connected"
        if self._status_line is not None and text != self._status_line:
            sdnotify.status(text)
            self._status_line = text
