"""The relay's background work: stored bytes, expiry, purges, and sibling processes.

It keeps the stored bytes per circle (quotas and the relay-wide cap are checked against
them), deletes expired envelopes, purges deleted data from the storage's files within the
bound of protocol/relay.md ("Purge"), and, on a storage shared by several relay processes,
applies what the others changed and tells them the requests each device key made here
(their rate limits count what a key did at every process).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import trio

from ..protocol.crypto import short_key
from ..protocol.records import RecordRejected
from ..protocol.relaysession import RelayRules, Usage
from ..quietlog import QuietLogger
from .circles import CircleKeeper
from .commits import GroupCommitWriter
from .connection import RelayConnection
from .storage import PURGE_DEBOUNCE_S, RelayStorage, StorageEvent, StorageUnavailable

log = logging.getLogger("meshd.relay.server")
quiet = QuietLogger(log)

EXPIRY_SWEEP_S = 300.0
# How often relay processes on a shared storage tell each other the requests each device
# key made (their rate limits count what a key did at every process, this late at most).
RATE_SHARE_S = 0.1


class Upkeep:
    def __init__(self, rules: RelayRules[RelayConnection], storage: RelayStorage,
                 writer: GroupCommitWriter, read: Callable[..., Awaitable[Any]],
                 circles: CircleKeeper, wall_clock: Callable[[], float]) -> None:
        self._rules = rules
        self._storage = storage
        self._writer = writer
        self._read = read
        self._circles = circles
        self._wall_clock = wall_clock
        self.usage = Usage(storage.usage())
        self._purge_due = trio.Event()  # something was deleted: purge it from the files
        self.purges = 0

    def used(self, circle_id: bytes) -> int:
        return self.usage.get(circle_id, 0)

    def freed(self, circle_id: bytes, size: int) -> None:
        """size bytes of the circle were deleted: count them, and purge them from the files."""
        self.usage[circle_id] = max(0, self.used(circle_id) - size)
        if size:
            self._purge_due.set()

    async def run(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._sweep_periodically)
        nursery.start_soon(self._purge_when_due)
        if self._storage.shared:
            self._rules.share_rates = True
            nursery.start_soon(self._follow_storage)
            nursery.start_soon(self._share_rates)

    async def expire(self) -> int:
        """Delete expired envelopes now; returns the bytes freed."""
        freed = await self._writer.run(lambda: self._storage.delete_expired(self._wall_clock()))
        for circle_id, size in freed.items():
            self.freed(circle_id, size)
        self._rules.sweep(trio.current_time())
        return sum(freed.values())

    async def _sweep_periodically(self) -> NoReturn:
        while True:
            await trio.sleep(EXPIRY_SWEEP_S)
            await self.expire()

    async def _purge_when_due(self) -> NoReturn:
        """One purge per PURGE_DEBOUNCE_S at most."""
        while True:
            await self._purge_due.wait()
            await trio.sleep(PURGE_DEBOUNCE_S)  # debounce: one purge for a burst of acks
            self._purge_due = trio.Event()
            try:
                done = await self._writer.run(self._storage.purge)
            except Exception as err:  # noqa: BLE001 - a storage failure: logged, retried
                log.error("purging deleted data from the storage failed: %s", err)
                done = False
            if done:
                self.purges += 1
            else:
                self._purge_due.set()  # a reader held the WAL: try again after the debounce

    async def _follow_storage(self) -> NoReturn:
        """Apply what other relay processes on the same storage changed."""
        events = getattr(self._storage, "events")  # noqa: B009 - shared storages only
        while True:
            for event in await events():
                try:
                    await self.apply_storage_event(event)
                except StorageUnavailable as err:
                    log.warning("storage unavailable while following other relay processes "
                                "(%s): re-reading everything once it answers", err)
                    await self._resync_when_available()
                except RecordRejected as err:  # only if the database was altered
                    log.error("stored records of circle %s do not verify (%s): ignoring them",
                              short_key(event.circle_id), err)

    async def _resync_when_available(self) -> None:
        while True:
            await trio.sleep(1)
            try:
                await self.apply_storage_event(StorageEvent("resync"))
                return
            except StorageUnavailable:
                continue

    async def _share_rates(self) -> NoReturn:
        rules = self._rules
        while True:
            await trio.sleep(RATE_SHARE_S)
            if not rules.rate_taken:
                continue
            taken, rules.rate_taken = rules.rate_taken, {}
            try:
                await self._read(self._storage.share_rates, taken)
            except StorageUnavailable as err:
                quiet.warning(("storage", str(err)), "sharing rate counts failed: %s", err)

    async def apply_storage_event(self, event: StorageEvent) -> None:
        rules = self._rules
        if event.kind == "rate":  # circle_id holds the device key here
            rules.charge_rate(event.circle_id, trio.current_time(), event.delta)
        elif event.kind == "deposit":
            self.usage[event.circle_id] = self.used(event.circle_id) + event.delta
            for subscriber in rules.subscribers(event.circle_id, event.mailbox):
                subscriber.push_nowait()
        elif event.kind == "usage":
            self.usage[event.circle_id] = max(0, self.used(event.circle_id) + event.delta)
        elif event.kind == "records":
            await self._circles.reload(event.circle_id)
        elif event.kind == "resync":  # events may have been missed: read everything again
            # (Deposits of ours in flight are missing from this count until they commit.)
            self.usage = Usage(await self._read(self._storage.usage))
            for circle_id, _ in await self._read(self._storage.all_circle_records):
                await self._circles.reload(circle_id)
            for subscriber in rules.all_subscribers():
                subscriber.push_nowait()
