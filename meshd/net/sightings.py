"""Circle devices seen on the LAN, as discovery hands them to the peer manager.

A sighting is sent when a device is new or its addresses or port changed, never again for
the same advert; when the consumer is behind it is dropped and the next advert repeats it.
meshd/net/discovery.py (the zeroconf bridge) feeds it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from ..quietlog import QuietLogger

log = logging.getLogger("meshd.net.discovery")
quiet = QuietLogger(log)

SIGHTINGS_BUFFER = 64


@dataclass(frozen=True, slots=True)
class Sighting:
    """A circle device seen on the LAN: its hint (from the decrypted advert), where to dial."""

    tag_owner: bytes
    addresses: list[str]
    port: int


class SightingFeed:
    """Which mDNS name is which device, and the channel its sightings go out on."""

    def __init__(self) -> None:
        self._send, self.receive = trio.open_memory_channel[Sighting](SIGHTINGS_BUFFER)
        self._hint_of_name: dict[str, bytes] = {}
        self._last: dict[bytes, Sighting] = {}

    def seen(self, name: str, sighting: Sighting) -> None:
        hint = sighting.tag_owner
        self._hint_of_name[name] = hint
        if self._last.get(hint) == sighting:
            return
        self._last[hint] = sighting
        try:
            self._send.send_nowait(sighting)
        except trio.WouldBlock:
            # The consumer is behind: forget it so the next advert repeats it.
            del self._last[hint]
            quiet.warning("sightings-full", "discovery: sighting consumer is behind")

    def forget(self, name: str) -> None:
        """The service went away: its device is new again when next seen under any name."""
        hint = self._hint_of_name.pop(name, None)
        if hint is not None and hint not in self._hint_of_name.values():
            self._last.pop(hint, None)

    def clear(self) -> None:
        self._hint_of_name.clear()
        self._last.clear()

    async def aclose(self) -> None:
        await self._send.aclose()


def offer(send: trio.MemorySendChannel[str], name: str) -> None:
    """Hand an mDNS name to a trio channel from run_sync_soon; a full or closed one drops it."""
    try:
        send.send_nowait(name)
    except (trio.WouldBlock, trio.ClosedResourceError):
        pass
