"""The relay's rendezvous, trio side: offers, joins, pipes and their timers.

The rendezvous table and its rules (one offer per nameplate, the first join consumes it,
the pipe's byte cap, who is told what when it ends) are protocol/relaysession.py's. This
module adds what waits: the shared storage's nameplate claims (one offer per nameplate
across the relay's processes), a join passed on to the process holding the offer
(relay/proxy.py), each rendezvous's deadline, and the pipe's backpressure (a side's reader
waits while the other side's queue of pipe frames is full).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..protocol.crypto import DHKeyPair, RandomSource
from ..protocol.relay import (
    MAX_PIPE_TOTAL_BYTES,
    NAMEPLATE_IN_USE,
    OFFER_TTL_S,
    PIPE_LIFETIME_S,
    RENDEZVOUS_BUSY,
    RelayError,
    Rendezvous,
    Request,
)
from ..protocol.relaysession import Ended, Meeting, RelayRules
from .connection import MAX_PIPE_FRAMES_QUEUED, RelayConnection
from .proxy import open_upstream, pump_upstream
from .storage import RelayStorage, StorageUnavailable

log = logging.getLogger("meshd.relay.server")

Read = Callable[..., Awaitable[Any]]


class RendezvousDesk:
    def __init__(self, rules: RelayRules[RelayConnection], storage: RelayStorage, read: Read,
                 static: DHKeyPair, rng: RandomSource, wall_clock: Callable[[], float]) -> None:
        self.rules = rules
        self._storage = storage
        self._read = read
        self._static = static
        self._rng = rng
        self._wall_clock = wall_clock
        self._timers: dict[Meeting[RelayConnection], trio.CancelScope] = {}
        # HOST:PORT the other relay processes on a shared storage reach this one at (set
        # by run_relay): offers held here are joinable there.
        self.advertise: str | None = None
        self.tasks: trio.Nursery | None = None  # the relay's own nursery (releases)

    @property
    def _shares_offers(self) -> bool:
        return self._storage.shared and self.advertise is not None

    async def offer(self, device: RelayConnection, request: Rendezvous) -> None:
        """Hold the offer until a join consumes it (no answer until then) or it expires."""
        self.rules.check_offer(device, request.nameplate)
        if self._shares_offers:  # one offer per nameplate across the relay's processes
            now = self._wall_clock()
            claimed = await self._read(self._storage.claim_nameplate, request.nameplate,
                                       self.advertise, now, now + OFFER_TTL_S)
            if not claimed:
                raise RelayError(NAMEPLATE_IN_USE, f"nameplate {request.nameplate} has an offer")
        meeting = self.rules.offer(device, request, trio.current_time(), claimed=self._shares_offers)
        timer = self._timers[meeting] = trio.CancelScope(deadline=meeting.deadline)
        assert device.nursery is not None
        # In the offerer's nursery: the timer ends with the offerer's connection at the latest.
        device.nursery.start_soon(self._timer, meeting, timer)
        log.debug("rendezvous %d: offered by %r", request.nameplate, device.key)

    async def join(self, device: RelayConnection, request: Rendezvous) -> None:
        if device.upstream is not None:
            raise RelayError(RENDEZVOUS_BUSY, "this connection already has a rendezvous")
        self.rules.check_free(device)
        # A sibling relay process passing a join on (the relay's own key, which only its
        # processes hold) was limited where the joiner connected.
        sibling = device.key == self._static.public
        meeting = self.rules.take_offer(request.nameplate)
        if meeting is None and self._shares_offers and not sibling:
            held_at = await self._read(self._storage.nameplate_offered_at, request.nameplate,
                                       self._wall_clock())
            if held_at is not None and held_at != self.advertise:
                upstream = await open_upstream(held_at, request, self._static, self._rng)
                device.upstream = upstream
                assert device.nursery is not None
                device.nursery.start_soon(pump_upstream, device, upstream, MAX_PIPE_FRAMES_QUEUED)
                log.debug("rendezvous %d: join passed on to %s", request.nameplate, held_at)
                return
            meeting = self.rules.take_offer(request.nameplate)  # offered meanwhile
        if meeting is not None and self.rules.consumed(meeting):
            self._release(meeting.nameplate)
        for side, frame in self.rules.join(device, meeting, request, trio.current_time(),
                                           sibling=sibling):
            side.answer_nowait(frame)
        assert meeting is not None
        self._timers[meeting].deadline = meeting.deadline
        log.debug("rendezvous %d: joined by %r", request.nameplate, device.key)

    async def pipe(self, device: RelayConnection, request: Request) -> None:
        step = self.rules.pipe(device, request)
        if isinstance(step, Ended):
            if step.meeting.piped_bytes > MAX_PIPE_TOTAL_BYTES:
                log.info("rendezvous %d: pipe closed past %d bytes", step.meeting.nameplate,
                         MAX_PIPE_TOTAL_BYTES)
            self.apply(step)
            return
        if step is None:
            return
        meeting = device.rendezvous
        assert meeting is not None
        other = step.to
        # Backpressure: stop reading this side while the other side's queue is full.
        while other.pipe_queued >= MAX_PIPE_FRAMES_QUEUED and not meeting.closed:
            other.pipe_room = trio.Event()
            await other.pipe_room.wait()
        if meeting.closed:
            return
        other.pipe_queued += 1
        other.answer_nowait(step.frame)

    async def _timer(self, meeting: Meeting[RelayConnection], timer: trio.CancelScope) -> None:
        with timer:
            await trio.sleep_forever()
        if meeting.closed:
            return  # ended by a close or a disconnect, which cancelled the timer
        if meeting.join is None:
            log.debug("rendezvous %d: offer expired", meeting.nameplate)
        else:
            log.info("rendezvous %d: pipe closed after %g s", meeting.nameplate, PIPE_LIFETIME_S)
        self.apply(self.rules.expire(meeting))

    def apply(self, ended: Ended[RelayConnection] | None) -> None:
        """Carry out the end of a rendezvous: its frames, timer, claim and joiner-only sides."""
        if ended is None:
            return
        meeting = ended.meeting
        timer = self._timers.pop(meeting, None)
        if timer is not None:
            timer.cancel()
        if ended.release:
            self._release(meeting.nameplate)
        for side in (meeting.offer, meeting.join):
            if side is not None:
                side.pipe_room.set()  # a sender waiting for room sees the pipe closed
        for side, frame in ended.sends:
            side.answer_nowait(frame)
        for side in ended.finish:
            side.close_reason = "rendezvous over"
            side.finish = True
            side.wakeup.set()

    def _release(self, nameplate: int) -> None:
        """Forget the offer's record in the shared storage (consumed or ended), in the
        background: nothing waits on it, and an unreleased record expires anyway."""
        if self.tasks is None:
            return

        async def release() -> None:
            try:
                await self._read(self._storage.release_nameplate, nameplate, self.advertise)
            except StorageUnavailable as err:
                log.info("rendezvous %d: releasing the nameplate failed (%s); it expires",
                         nameplate, err)

        self.tasks.start_soon(release)
