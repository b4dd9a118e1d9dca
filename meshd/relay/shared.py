"""The circle's relay list, shared by every member through the members' own logs.

`meshctl relay add` and `relay remove` on one device must reach the others (they may only be
reachable through that relay from now on). Rather than a new message type, the list travels
the way everything else does: as records of the reserved stream `meshd/relays` in the
writing device's log, so it syncs over the LAN and through relays, is signed by its author,
outlives restarts, and is part of the relay backup. One record per relay address (the
record id is the address; the body is `use` or `remove`); the log's view keeps the latest
write per id by (hlc, author, seq), so concurrent changes converge on every device.

Each device follows the stream and makes its relay links match: a relay marked `use` is
linked, one marked `remove` is dropped — except relays named in the local config file, which
only that file controls. Records that are not a valid relay address are ignored (a member
wrote them; they are logged, never acted on).
"""

from __future__ import annotations

import logging
from itertools import repeat
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..errors import Conflict
from ..net.logsync import LogService
from .address import RelayAddress, RelayAddressError

if TYPE_CHECKING:
    from ..api.events import EventBus
    from ..config import Config
    from .links import RelayLinks

log = logging.getLogger(__name__)

RELAYS_STREAM = "meshd/relays"
USE, REMOVE = b"use", b"remove"
PAGE = 500
# A device links to at most this many relays of the shared list: the first marked `use`, in
# the stream's view order, so every device takes the same ones. Anyone in the circle (an
# app, through the API) can write thousands of addresses; each would be a link, with its
# dials and timers, on every device (500 made each API request of a device wait 1-3 s).
MAX_SHARED_RELAYS = 16


def shared_relays(logs: LogService) -> dict[str, bool]:
    """address -> True (use) / False (remove), from the stream's current view: at most
    MAX_SHARED_RELAYS marked use, the first in view order (read_list)."""
    return read_list(logs)[0]


def read_list(logs: LogService) -> tuple[dict[str, bool], list[str]]:
    """shared_relays(logs), and the addresses marked use past the first MAX_SHARED_RELAYS:
    the follower drops its links to those (records that sort earlier can arrive by sync and
    push a linked relay past the bound). The records ignored are logged in one line per
    read: anyone in the circle (an app, through the API) can write thousands, and a line
    for each at every change of the stream flooded the log of every device and held the
    event loop (review s9)."""
    wanted: dict[str, bool] = {}
    past: list[str] = []
    ignored, example, uses = 0, "", 0
    after: str | None = None
    while True:
        page = logs.read(RELAYS_STREAM, after=after, limit=PAGE)
        for record in page["records"]:
            address, body = record["id"], record["body"]
            try:
                if body not in (USE, REMOVE):
                    raise RelayAddressError(f"the body of {address!r} is neither use nor remove")
                RelayAddress.parse(address)
            except RelayAddressError as err:
                ignored += 1
                example = example or str(err)[:200]
                continue
            if body == USE:
                if uses >= MAX_SHARED_RELAYS:
                    past.append(address)
                    continue
                uses += 1
            wanted[address] = body == USE
        after = page["next"]
        if after is None:
            if ignored:
                log.warning("ignoring %d records of %s that are not a relay address marked use or "
                            "remove (the first: %s)", ignored, RELAYS_STREAM, example)
            if past:
                log.warning("ignoring %d relays of %s past the first %d marked use", len(past),
                            RELAYS_STREAM, MAX_SHARED_RELAYS)
            return wanted, past


class RelaySetHost(Protocol):
    """What following the shared list needs of the daemon (relayset.py never imports it)."""

    @property
    def logs(self) -> LogService: ...
    @property
    def config(self) -> Config: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def relay_links(self) -> RelayLinks | None: ...
    async def start_relay_links(self) -> RelayLinks | None: ...


def check_room(logs: LogService, address: str) -> None:
    """Refuse to share a relay past the first MAX_SHARED_RELAYS marked use, before it is
    linked or written: every device's follower would drop it, or another relay it sorts
    before, while the caller was told it was added (review s9-2)."""
    wanted = shared_relays(logs)
    if wanted.get(address) is not True and sum(wanted.values()) >= MAX_SHARED_RELAYS:
        raise Conflict("relay-list-full", f"the circle already shares {MAX_SHARED_RELAYS} relays "
                       "(the most it uses): remove one first (meshctl relay remove ADDRESS)")


async def publish(logs: LogService, address: str, *, use: bool) -> None:
    """Tell the circle (and this device's follower) that address is used or removed."""
    if shared_relays(logs).get(address) is use:
        return  # already so: no new entry
    await logs.write(RELAYS_STREAM, address, USE if use else REMOVE)


async def follow(daemon: RelaySetHost) -> None:
    """Keep this device's relay links equal to the shared list (runs for the daemon's life).
    It is read again only after a commit that changed the stream (Store.stream_changes), which
    a listener of each commit looks at: waking to read it at every commit cost the soak's
    daemons a task wake-up and a query per entry (issue 20)."""
    store = daemon.logs.store
    while True:
        seen = store.stream_changes(RELAYS_STREAM)  # before reading: a change meanwhile reads again
        await apply(daemon)
        await _changed_since(daemon.logs, seen)


async def _changed_since(logs: LogService, seen: int) -> None:
    """Until a commit changed the stream after its `seen`th change."""
    moved = trio.Event()

    def heard() -> None:
        if logs.store.stream_changes(RELAYS_STREAM) != seen:
            moved.set()

    undo = logs.changed.listen(heard)
    try:
        heard()  # a commit during apply
        await moved.wait()
    finally:
        undo()


async def apply(daemon: RelaySetHost) -> dict[str, Any]:
    wanted, past = read_list(daemon.logs)
    added, removed = [], []
    # A relay pushed past the bound is dropped as one marked remove: every device then uses
    # the same MAX_SHARED_RELAYS (review s9-2: kept, a device that had linked the first ones
    # before earlier-sorting records arrived by sync used them all).
    for address, use in [*zip(past, repeat(False)), *wanted.items()]:  # (drops first)
        links = daemon.relay_links
        if use and (links is None or not links.uses(address)):
            links = await daemon.start_relay_links()
            if links is not None:
                await links.add(address)
                added.append(address)
        elif not use and links is not None and links.uses(address):
            if address in daemon.config.relays:
                continue  # the config file names it: only the file can drop it
            links.remove(address)
            removed.append(address)
    for address in added:
        log.info("using relay %s (shared by the circle)", address)
        daemon.events.publish("relay.added", relay=address)
    for address in removed:
        log.info("no longer using relay %s (removed in the circle, or past the first %d)",
                 address, MAX_SHARED_RELAYS)
        daemon.events.publish("relay.removed", relay=address)
    return {"added": added, "removed": removed}
