"""The relay's requests carried out: mailboxes, backups and segments against the storage.

RelayServer (relay/server.py) reads a connection's requests and has protocol/relaysession.py
decide whether the connection may make them; this carries each out and queues its answer on
the connection (never sending from the reading task). Deposits are queued for the group
commit (relay/commits.py) in arrival order and answered once committed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..protocol.relay import (
    CONFLICT,
    INTERNAL,
    MAX_FETCH_BYTES,
    ROLE_OFFER,
    Ack,
    BackupGet,
    BackupPut,
    Deposit,
    Fetch,
    RecordsGet,
    Register,
    RelayError,
    Rendezvous,
    Request,
    SegmentDelete,
    SegmentGet,
    SegmentList,
    SegmentPut,
    Subscribe,
    backup_frame,
    envelopes_frame,
    error_frame,
    ok_frame,
    records_frame,
    segment_frame,
    segments_frame,
)
from ..protocol.relaysession import RelayRules
from ..protocol.removal import removed_dh_keys
from .circles import CircleKeeper
from .commits import GroupCommitWriter
from .connection import RelayConnection
from .meetings import RendezvousDesk
from .storage import NewEnvelope, RelayStorage
from .upkeep import Upkeep

log = logging.getLogger("meshd.relay.server")

# Deposits of one connection waiting for their commit; past this the relay stops reading
# from that connection until some are committed (backpressure on the storage's pace).
MAX_DEPOSITS_IN_FLIGHT = 128


class Requests:
    def __init__(self, storage: RelayStorage, rules: RelayRules[RelayConnection],
                 writer: GroupCommitWriter, read: Callable[..., Awaitable[Any]],
                 upkeep: Upkeep, circles: CircleKeeper, meetings: RendezvousDesk,
                 wall_clock: Callable[[], float]) -> None:
        self.storage = storage
        self.rules = rules
        self.limits = rules.limits
        self.admission = rules.admission
        self._writer = writer
        self._read = read
        self.upkeep = upkeep
        self._circles = circles
        self._meetings = meetings
        self._wall_clock = wall_clock
        self.backup_bytes_received = 0  # backup and segment blobs stored

    async def _envelopes_after(self, circle_id: bytes, mailbox: bytes, after: int, limit: int,
                               max_bytes: int) -> tuple[list[tuple[int, bytes]], bool]:
        found: tuple[list[tuple[int, bytes]], bool] = await self._read(
            self.storage.envelopes_after, circle_id, mailbox, after, now=self._wall_clock(),
            limit=limit, max_bytes=max_bytes)
        return found

    def used(self, circle_id: bytes) -> int:
        return self.upkeep.used(circle_id)

    async def dispatch(self, device: RelayConnection, request: Request) -> None:
        circle_id = device.circle_id
        match request:
            case Register():
                await self._circles.register(device, request)
            case Deposit():
                await self._deposit(device, request)
            case Fetch(rid, mailbox, after, limit):
                assert circle_id is not None
                items, more = await self._envelopes_after(circle_id, mailbox, after, limit, MAX_FETCH_BYTES)
                device.answer_nowait(envelopes_frame(rid, mailbox, items, more))
            case Ack(rid, mailbox, upto):
                assert circle_id is not None
                freed = await self._writer.run(lambda: self.storage.delete_through(circle_id, mailbox, upto))
                self.upkeep.freed(circle_id, freed)
                device.answer_nowait(ok_frame(rid))
            case Subscribe(rid, mailbox, after, notify):
                self.rules.subscribe(device, mailbox, after, notify)
                device.answer_nowait(ok_frame(rid))
                device.push_nowait()
            case RecordsGet(rid):
                assert circle_id is not None
                device.answer_nowait(records_frame(rid, self.rules.circles[circle_id].records()))
            case BackupGet(rid):
                assert circle_id is not None
                stored = await self._read(self.storage.backup, circle_id)
                device.answer_nowait(backup_frame(rid, stored.version if stored else 0,
                                                  stored.blob if stored else None))
            case BackupPut():
                await self._backup_put(device, request)
            case SegmentPut():
                await self._segment_put(device, request)
            case SegmentGet(rid, segment_id):
                assert circle_id is not None
                blob = await self._read(self.storage.segment, circle_id, segment_id)
                device.answer_nowait(segment_frame(rid, segment_id, blob))
            case SegmentDelete(rid, ids):
                assert circle_id is not None
                freed = await self._writer.run(lambda: self.storage.delete_segments(circle_id, ids))
                self.upkeep.freed(circle_id, freed)  # the deleted segments' bytes
                device.answer_nowait(ok_frame(rid, freed=freed))
            case SegmentList(rid, after, limit, owner):
                assert circle_id is not None
                # Another key's blobs only once the circle removed it: an active member's may
                # be an upload in flight; a removed one's, the relay refuses it any more.
                if owner and owner not in removed_dh_keys(self.rules.circles[circle_id]):
                    items = []
                else:
                    items = await self._read(self.storage.segments_of, circle_id,
                                             owner or device.key, after, limit + 1)
                device.answer_nowait(segments_frame(rid, items[:limit], len(items) > limit))
            case Rendezvous():
                if request.role == ROLE_OFFER:
                    await self._meetings.offer(device, request)
                else:
                    await self._meetings.join(device, request)

    async def _deposit(self, device: RelayConnection, request: Deposit) -> None:
        # Checked and queued here, in arrival order, without waiting for the commit: one
        # connection's pipelined deposits share group commits; deposited() answers each.
        circle_id = device.circle_id
        assert circle_id is not None
        size = len(request.envelope)
        usage = self.upkeep.usage
        self.limits.check_deposit(size, self.used(circle_id))
        self.admission.check_store(size, usage.total)
        while device.deposits_in_flight >= MAX_DEPOSITS_IN_FLIGHT:
            device.room = trio.Event()
            await device.room.wait()
        device.deposits_in_flight += 1
        usage[circle_id] = self.used(circle_id) + size  # reserved until the commit

        def deposited(pending: Any) -> None:
            device.deposits_in_flight -= 1
            device.room.set()
            if pending.error is not None:
                self.upkeep.usage[circle_id] = self.used(circle_id) - size
                log.error("storing an envelope failed: %s", pending.error)
                device.answer_nowait(error_frame(request.rid, RelayError(
                    INTERNAL, "the relay could not store it; retry later")))
                return
            for subscriber in self.rules.subscribers(circle_id, request.mailbox):
                subscriber.push_nowait()
            device.answer_nowait(ok_frame(request.rid, id=pending.result))

        self._writer.deposit_nowait(NewEnvelope(
            circle_id, request.mailbox, request.envelope, self._wall_clock() + self.limits.ttl_s),
            deposited)

    async def _backup_put(self, device: RelayConnection, request: BackupPut) -> None:
        circle_id = device.circle_id
        assert circle_id is not None
        current = await self._read(self.storage.backup, circle_id)
        replaced = len(current.blob) if current else 0
        self.limits.check_backup(len(request.blob), self.used(circle_id), replaced)
        self.admission.check_store(len(request.blob) - replaced, self.upkeep.usage.total)
        conflict = await self._writer.run(lambda: self.storage.put_backup(
            circle_id, request.expected_version, request.version, request.blob))
        if conflict is not None:
            raise RelayError(CONFLICT, f"the stored backup is version {conflict.version}")
        self.upkeep.usage[circle_id] = self.used(circle_id) + len(request.blob)
        self.upkeep.freed(circle_id, replaced)  # the superseded backup's bytes
        self.backup_bytes_received += len(request.blob)
        device.answer_nowait(ok_frame(request.rid, version=request.version))

    async def _segment_put(self, device: RelayConnection, request: SegmentPut) -> None:
        circle_id = device.circle_id
        assert circle_id is not None
        size = len(request.blob)
        self.limits.check_segment(size, self.used(circle_id))
        self.admission.check_store(size, self.upkeep.usage.total)
        self.upkeep.usage[circle_id] = self.used(circle_id) + size  # reserved until the commit
        stored = False
        try:
            stored = await self._writer.run(lambda: self.storage.put_segment(
                circle_id, request.id, request.blob, device.key))
        finally:
            if not stored:
                self.upkeep.usage[circle_id] = max(0, self.used(circle_id) - size)
        if not stored:
            raise RelayError(CONFLICT, "a segment with this id is already stored")
        self.backup_bytes_received += size
        device.answer_nowait(ok_frame(request.rid))
