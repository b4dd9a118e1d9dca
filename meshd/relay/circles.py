"""The relay's circles: registration, verifying and merging offered records, telling members.

The rules (who may register, who is a member, who is told) are protocol/relaysession.py's;
this is the trio side: verification in worker threads (a stranger's records cost at most
one core, one offer at a time, within a budget), merges through the storage's
read-modify-write (another relay process's merge is never overwritten), and the frames that
tell connected members their circle changed or that they were removed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import trio

from ..protocol.circle import Circle
from ..protocol.crypto import short_key
from ..protocol.records import RecordRejected
from ..protocol.relay import (
    BAD_RECORDS,
    NOT_A_MEMBER,
    Register,
    RelayError,
    error_frame,
    records_push_frame,
    registered_frame,
)
from ..protocol.relaysession import Ended, RelayRules
from .commits import GroupCommitWriter
from .connection import RelayConnection
from .storage import RelayStorage

log = logging.getLogger("meshd.relay.server")

T = TypeVar("T")
Read = Callable[..., Awaitable[Any]]

# Verification steps one offer may cost (circle.py: one per record along a chain, the
# ancestor count for a record merging branches): a 4096-record chain with ~100 merges.
MAX_OFFER_COST = 400_000
SMALL_OFFER_RECORDS = 64
# How long a removed member's connection has to take its notice before it is closed.
REMOVED_GRACE_S = 1.0


class CircleKeeper:
    def __init__(self, rules: RelayRules[RelayConnection], storage: RelayStorage,
                 writer: GroupCommitWriter, read: Read, used: Callable[[bytes], int],
                 end_rendezvous: Callable[[Ended[RelayConnection] | None], None]) -> None:
        self.rules = rules
        self._end_rendezvous = end_rendezvous  # a removed member's offer or pipe ends
        self._storage = storage
        self._writer = writer
        self._read = read
        self._used = used
        self._merge_lock = trio.Lock()
        # One thread verifies large offers, another small ones: a stranger's 4,000 records
        # never make a typical circle (a few dozen records) wait behind them.
        self._verify_limiters = (trio.CapacityLimiter(1), trio.CapacityLimiter(1))

    def load(self, stored: list[tuple[bytes, list[bytes]]]) -> None:
        for circle_id, records in stored:
            try:
                self.rules.remember(Circle.from_records(records))
            except RecordRejected as err:  # only if the database was altered
                log.error("stored records of circle %s do not verify (%s): ignoring them",
                          short_key(circle_id), err)

    async def register(self, device: RelayConnection, request: Register) -> None:
        rules = self.rules
        if not request.records:
            circle = rules.circle_of_member(device.key)
        else:
            circle = rules.circle_for(request.records) or await self.merge(
                request.records, registrant=device, token=request.token)
        if notice := rules.bind(device, circle):
            device.answer_nowait(records_push_frame(notice))  # so it learns it was removed
        rules.enrol(device)
        log.debug("%r registered for circle %s", device.key, short_key(circle.circle_id))
        device.answer_nowait(registered_frame(request.rid, circle.circle_id, rules.limits,
                                              self._used(circle.circle_id),
                                              self._storage.incarnation()))

    def _limiter_for(self, records: Sequence[bytes]) -> trio.CapacityLimiter:
        return self._verify_limiters[len(records) <= SMALL_OFFER_RECORDS]

    async def merge(self, records: tuple[bytes, ...], *,
                    registrant: RelayConnection | None = None, token: bytes | None = None) -> Circle:
        """Verify and merge offered records; a new circle must be admitted (with `token`,
        the registration's enrolment token, at a relay in token mode)."""
        rules = self.rules
        rules.admit(records, token)
        # Verification is CPU work a stranger can ask for: off the event loop, one at a time
        # (so one offer costs at most one core's share), and bounded by a budget.
        try:
            offered = await trio.to_thread.run_sync(
                partial(Circle.from_records, records, max_cost=MAX_OFFER_COST),
                limiter=self._limiter_for(records))
        except RecordRejected as err:
            raise RelayError(BAD_RECORDS, f"records do not verify ({err.reason})") from err
        circle_id = offered.circle_id
        async with self._merge_lock:  # one merge at a time: each builds on the last
            held = rules.circles.get(circle_id)
            if held is None:
                stored = await self._read(self._storage.circle_records, circle_id)
                if stored is not None:
                    held = await trio.to_thread.run_sync(Circle.from_records, stored,
                                                         limiter=self._limiter_for(stored))
            if held is None:
                rules.admission.check_new_circle(circle_id, len(rules.circles), token)
            unchanged = held is not None and not (await trio.to_thread.run_sync(
                merged_copy, held, records, limiter=self._limiter_for(records)))[1]
            if held is not None and unchanged:
                rules.remember(held)  # nothing new: no write
                merged, changed = held, False
            else:
                result: list[Circle] = []

                def merge(stored: list[bytes] | None) -> list[bytes] | None:
                    # In the writer's thread, inside the storage's read-modify-write: what
                    # another relay process on the same storage merged is never overwritten.
                    circle, new = (offered, True) if stored is None else merged_copy(
                        Circle.from_records(stored), records)
                    result.append(circle)
                    return circle.records() if new else None

                await self._writer.run(lambda: self._storage.update_circle_records(circle_id, merge))
                merged, changed = result[0], True
                rules.remember(merged)
        if changed:
            await self._close_removed_members(circle_id)
            await self._push_records(circle_id, registrant)
        return merged

    async def reload(self, circle_id: bytes) -> None:
        """Take the stored record set (another process merged into it)."""
        async with self._merge_lock:
            # Read under the lock: a merge of ours cannot land between the read and the
            # update, so the view never goes back to an older set.
            stored = await self._read(self._storage.circle_records, circle_id)
            if stored is None:
                return
            circle = Circle.from_records(stored)
            held = self.rules.circles.get(circle_id)
            if held is not None and held.records() == circle.records():
                return
            self.rules.remember(circle)
        await self._close_removed_members(circle_id)
        await self._push_records(circle_id)

    async def _push_records(self, circle_id: bytes, registrant: RelayConnection | None = None) -> None:
        """Tell the circle's other connected members the record set changed (a removal, a
        new epoch): a device that cannot reach the others learns it here, then finds its new
        epoch's mailbox. Through their send queues: a member that does not read never holds
        up the registration."""
        frame = records_push_frame(self.rules.circles[circle_id].records())
        for device in self.rules.others(circle_id, registrant):
            device.answer_nowait(frame)

    async def _close_removed_members(self, circle_id: bytes) -> None:
        for device, notice, ended in self.rules.removed(circle_id):
            log.info("%r is no longer a member: closing its connection", device.key)
            self._end_rendezvous(ended)
            if notice:  # so it learns it was removed
                device.answer_nowait(records_push_frame(notice))
            device.answer_nowait(error_frame(None, RelayError(NOT_A_MEMBER, "removed from the circle")))
            device.close_reason = NOT_A_MEMBER
            device.finish_within(REMOVED_GRACE_S)


def merged_copy(circle: Circle, records: tuple[bytes, ...]) -> tuple[Circle, bool]:
    """A copy of circle with records merged in (a failure leaves circle as it was), and
    whether that changed it."""
    copy = Circle.from_records(circle.records())
    try:
        return copy, bool(copy.merge(records, max_cost=MAX_OFFER_COST))
    except RecordRejected as err:
        raise RelayError(BAD_RECORDS, f"records do not merge ({err.reason})") from err
