"""What the relay path needs of the daemon, and the small state it keeps in the store.

RelayLinks, its deposits and its mailbox drains (relay/links.py, relay/deposits.py,
relay/mailboxes.py) never import the daemon: the daemon passes itself as a RelayHost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..api.events import EventBus
    from ..api.metrics import MeshdMetrics
    from ..config import Config
    from ..identity import DeviceIdentity
    from ..net.logsync import LogService
    from ..protocol.circle import Circle
    from ..protocol.crypto import RandomSource
    from ..store.db import Store

# Keys in the device's state table.
TRACKER_KEY = "relay.tracker"
VECTOR_OWED_KEY = "relay.vector-owed"


class RelayPresence(Protocol):
    """Where relay links report letters and connections (presence.Presence)."""

    def relay_letter(self, sender: bytes, relay: str) -> None: ...
    def relay_connection_changed(self, relay: str, *, up: bool) -> None: ...


class ConnectedPeers(Protocol):
    """Which devices are reachable directly (peers.PeerManager)."""

    def connected_sign_keys(self) -> set[bytes]: ...


class RelayHost(Protocol):
    """What relay links need of the process that runs them (the daemon passes itself;
    the relay path never imports the daemon)."""

    @property
    def config(self) -> Config: ...
    @property
    def store(self) -> Store: ...
    @property
    def identity(self) -> DeviceIdentity: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def metrics(self) -> MeshdMetrics: ...
    @property
    def circle(self) -> Circle: ...
    @property
    def logs(self) -> LogService: ...
    @property
    def rng(self) -> RandomSource: ...
    @property
    def presence(self) -> RelayPresence: ...
    @property
    def peer_manager(self) -> ConnectedPeers: ...
    @property
    def is_member(self) -> bool: ...
    def count_error(self, kind: str) -> None: ...
    def merge_circle_records(self, records: list[bytes], *, source: str) -> None: ...
    def is_author_allowed(self, sign_key: bytes) -> bool: ...


def state_int(daemon: RelayHost, key: str) -> int:
    raw = daemon.store.get_state(key)
    return int(raw.decode()) if raw else 0


def set_int(daemon: RelayHost, key: str, value: int) -> None:
    daemon.store.set_state(key, str(value).encode())


def cursor_key(relay: str, mailbox: bytes) -> str:
    return f"relay.cursor.{relay}.{mailbox.hex()}"


def incarnation_key(relay: str) -> str:
    return f"relay.incarnation.{relay}"


def deposited_key(recipient: bytes) -> str:
    return f"relay.deposited.{recipient.hex()}"


def confirmed_key(recipient: bytes) -> str:
    return f"relay.confirmed.{recipient.hex()}"
