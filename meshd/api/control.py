"""What the local API needs of the daemon: ReadControl (what a read route may use) and
DaemonControl (everything; meshd/daemon.py implements it), and ReadOnlyView, the daemon as
a read route sees it (routes.py hands it to every route flagged R)."""

from __future__ import annotations

from typing import Any, Protocol

from .batch import BatchRecord
from .events import EventBus
from .metrics import Registry


class ReadControl(Protocol):
    """What a read route may use of the daemon: answers about its state, never a change."""

    @property
    def events(self) -> EventBus: ...
    @property
    def metrics(self) -> Registry: ...
    def status(self) -> dict[str, Any]: ...
    def peers(self) -> list[dict[str, Any]]: ...
    def devices(self) -> list[dict[str, Any]]: ...
    def relays(self) -> list[dict[str, Any]]: ...
    def read(self, stream: str, after: str | None, limit: int) -> dict[str, Any]: ...
    async def streams(self) -> list[dict[str, Any]]: ...


class DaemonControl(ReadControl, Protocol):
    """What the API needs from the daemon (meshd/daemon.py implements it)."""

    def require_member(self) -> None:
        """Raise Conflict("not-a-member") unless this device is a member of its circle."""
    async def invite(self) -> dict[str, Any]: ...
    async def join(self, code: str, address: str | None = None,
                   relay: str | None = None) -> dict[str, Any]: ...
    async def remove(self, device: str, *, force: bool = False,
                     recovery_words: list[str] | None = None,
                     distrust_since_ms: int | None = None) -> dict[str, Any]: ...
    async def recovery_key(self) -> dict[str, Any]: ...
    async def recover(self, words: list[str], relay: str, *, preview: bool = False,
                      readmit: list[str] | None = None) -> dict[str, Any]: ...
    async def add_relay(self, address: str, *, token: bytes | None = None) -> dict[str, Any]: ...
    async def remove_relay(self, address: str) -> dict[str, Any]: ...
    async def rename(self, name: str) -> dict[str, Any]: ...
    async def write(self, stream: str, record_id: str | None, body: bytes) -> dict[str, Any]: ...
    async def write_batch(self, records: list[BatchRecord]) -> list[dict[str, Any]]: ...
    async def write_puts(self, stream: str, bodies: list[bytes]) -> list[tuple[str, int]] | None:
        """Puts with fresh ids to one stream: (id, seq) each; None: use write_batch."""
    def read(self, stream: str, after: str | None, limit: int) -> dict[str, Any]: ...
    async def delete(self, stream: str, record_id: str) -> dict[str, Any]: ...
    async def clear(self, stream: str) -> dict[str, Any]: ...


class ReadOnlyView:
    """The daemon as a read route sees it: ReadControl's methods and nothing else (each
    looked up on the daemon when called)."""

    __slots__ = ("_control",)

    def __init__(self, control: ReadControl) -> None:
        self._control = control

    @property
    def events(self) -> EventBus:
        return self._control.events

    @property
    def metrics(self) -> Registry:
        return self._control.metrics

    def status(self) -> dict[str, Any]:
        return self._control.status()

    def peers(self) -> list[dict[str, Any]]:
        return self._control.peers()

    def devices(self) -> list[dict[str, Any]]:
        return self._control.devices()

    def relays(self) -> list[dict[str, Any]]:
        return self._control.relays()

    def read(self, stream: str, after: str | None, limit: int) -> dict[str, Any]:
        return self._control.read(stream, after, limit)

    async def streams(self) -> list[dict[str, Any]]:
        return await self._control.streams()
