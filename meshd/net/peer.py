"""One other device of the circle as the peer manager sees it, its redial backoff, and what
the manager needs of the daemon (PeerHost; the daemon passes itself, net/ never imports it)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..protocol.liveness import TIMERS
from .transport import SecureConnection

if TYPE_CHECKING:
    from ..api.events import EventBus
    from ..api.metrics import MeshdMetrics
    from ..identity import DeviceIdentity
    from ..protocol.circle import Circle
    from ..protocol.crypto import RandomSource
    from .logsync import LogService


@dataclass
class Backoff:
    """Jittered exponential backoff ("full jitter" over a doubling ceiling): after the n-th
    failure, a uniform wait in [c/2, c], c = min(backoff_cap_s, backoff_base_s * 2^(n-1))."""

    failures: int = 0
    not_before: float = 0.0

    def failed(self, now: float, rng: random.Random) -> None:
        self.failures += 1
        ceiling = min(TIMERS.backoff_cap_s, TIMERS.backoff_base_s * 2 ** (self.failures - 1))
        self.not_before = now + ceiling / 2 + rng.uniform(0, ceiling / 2)

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0


@dataclass(eq=False)
class Peer:
    """What the daemon knows about one other device of the circle."""

    sign_key: bytes
    dh_key: bytes
    name: str
    addresses: list[tuple[str, int]] = field(default_factory=list)
    connection: SecureConnection | None = None
    initiated_by_us: bool = False
    connected_since: float | None = None
    last_seen: float | None = None  # wall clock, for display
    behind: int = 0
    relay_reachable: bool = False
    backoff: Backoff = field(default_factory=Backoff)
    dialing: bool = False
    confirmed: bool = False  # the current connection has carried a message from the peer
    sighted_at: float = 0.0  # trio clock: when its current addresses were learned
    sync: Any = None

    @property
    def path(self) -> str | None:
        if self.connection is not None and self.confirmed:
            return "lan"
        if self.relay_reachable:
            return "relay"
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "device": self.sign_key.hex(),
            "name": self.name,
            "connected": self.connection is not None and self.confirmed,
            "path": self.path,
            "addresses": [f"{host}:{port}" for host, port in self.addresses],
            "last_seen": self.last_seen,
            "behind": getattr(self.sync, "behind", 0) if self.sync is not None else 0,
        }


class PeerHost(Protocol):
    """What the peer manager needs of the process that runs it (the daemon passes itself;
    peers.py never imports the daemon)."""

    @property
    def identity(self) -> DeviceIdentity: ...
    @property
    def rng(self) -> RandomSource: ...
    @property
    def circle(self) -> Circle: ...
    @property
    def logs(self) -> LogService: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def metrics(self) -> MeshdMetrics: ...
    @property
    def is_member(self) -> bool: ...
    def count_error(self, kind: str) -> None: ...
    def peer_changed(self, peer: Peer, *, up: bool, reason: str = "") -> None: ...
    def merge_circle_records(self, records: list[bytes], *, source: str) -> None: ...
    def is_author_allowed(self, sign_key: bytes) -> bool: ...
