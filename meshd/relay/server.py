"""`meshd relay`: the trio server that stores and forwards envelopes it cannot read.

A device connects over meshd's Noise_XX channel (any static key may finish the handshake),
then registers with its circle's membership records. The relay verifies them, merges them
into the newest record set it holds for that circle, and from then on serves the
connection only while its static key is an active member: a registration that brings a
member's removal closes that member's open connections at once. Everything else is storage
with limits (protocol/relay.md): per-circle quota, envelope size cap, TTL, per-key rate.

What the relay decides about a request (may this connection make it, which circle, who is
told) is protocol/relaysession.py's; this module reads requests, carries them out against
the storage and queues the answers. Per connection, one task reads and one task sends
(relay/connection.py): a device that stops reading never stalls the reading of requests.
Around it: relay/circles.py (registration and merges), relay/meetings.py (rendezvous),
relay/commits.py (group commit), relay/upkeep.py (expiry, purges, sibling processes).

Rendezvous (pairing through the relay, protocol/relay.md "Rendezvous"): a member offers a
nameplate, a device with no circle joins it on an unregistered connection, and the relay
then forwards relay.pipe frames between the two connections, in memory only. The pipe's
contents are the pairing handshake's Noise messages: the relay can read none of it, and
nothing of it reaches the storage.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NoReturn, TypeVar

import trio

from ..containment import report_bug
from ..excgroup import first_leaf
from ..net.listener import serve_secure
from ..net.tally import RefusalTally, cause_of
from ..net.transport import (
    CONNECTION_ERRORS,
    PeerClosed,
    SecureConnection,
    open_secure_connection,
)
from ..protocol.admission import Admission
from ..protocol.crypto import DHKeyPair, RandomSource
from ..protocol.relay import (
    INTERNAL,
    NOT_REGISTERED,
    Limits,
    RelayError,
    Request,
    error_frame,
    parse_request,
    request_id,
)
from ..protocol.relaysession import JOINER_ONLY, Meeting, RelayRules, is_pipe_frame
from ..quietlog import QuietLogger
from .circles import CircleKeeper
from .commits import GroupCommitWriter
from .connection import QUEUE_FULL, RelayConnection
from .meetings import RendezvousDesk
from .requests import Requests
from .storage import RelayStorage, StorageUnavailable
from .upkeep import Upkeep

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

T = TypeVar("T")

# A connection must register (its first frame) within this long after the handshake.
REGISTER_TIMEOUT_S = 10.0
# Storage reads in worker threads at once, for a storage whose reads block (PostgreSQL).
MAX_READ_THREADS = 8
DEFAULT_LIMITS = Limits()
DEFAULT_ADMISSION = Admission()


class RelayServer:
    """The relay over a storage and a clock; serve() puts it on listeners."""

    def __init__(
        self,
        storage: RelayStorage,
        static: DHKeyPair,
        *,
        limits: Limits = DEFAULT_LIMITS,
        admission: Admission = DEFAULT_ADMISSION,
        wall_clock: Callable[[], float] = time.time,
        rng: RandomSource = os.urandom,
    ) -> None:
        self.storage = storage
        self.static = static
        self.limits = limits
        self.admission = admission
        self.rules: RelayRules[RelayConnection] = RelayRules(limits, admission)
        self._per_source: dict[str, int] = {}  # source address -> open connections
        # Refused or dropped connections: one line per cause per address per minute.
        self._refusals = RefusalTally(log, "connections")
        self._drops = RefusalTally(log, "connections", verb="dropped")
        self.wall_clock = wall_clock
        self._rng = rng
        self._writer = GroupCommitWriter(storage)
        self._read_limiter = trio.CapacityLimiter(MAX_READ_THREADS)
        self.meetings = RendezvousDesk(self.rules, storage, self.read, static, rng, wall_clock)
        self.circles = CircleKeeper(self.rules, storage, self._writer, self.read, self.used,
                                    self.meetings.apply)
        self.circles.load(storage.all_circle_records())
        self.upkeep = Upkeep(self.rules, storage, self._writer, self.read, self.circles, wall_clock)
        self.requests = Requests(storage, self.rules, self._writer, self.read, self.upkeep,
                                 self.circles, self.meetings, wall_clock)

    # -- running --

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """The relay's own tasks (the writer, the expiry sweep), without listeners."""
        async with trio.open_nursery() as nursery:
            self.meetings.tasks = nursery
            await nursery.start(self._writer.serve)
            await self.upkeep.run(nursery)
            task_status.started()
        raise AssertionError("relay tasks returned")  # pragma: no cover

    async def serve(
        self, listeners: list[trio.SocketListener], *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Run the relay on listeners. Anyone may finish the handshake: authorisation is
        the circle registration."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            nursery.start_soon(partial(serve_secure, self.handle, listeners, static=self.static,
                                       authorize=lambda key: True, rng=self._rng))
            task_status.started()
        raise AssertionError("relay server returned")  # pragma: no cover

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one device on an already open stream (tests, or a stream handed over)."""
        try:
            connection = await open_secure_connection(
                stream, initiator=False, static=self.static, authorize=lambda key: True,
                rng=self._rng)
        except CONNECTION_ERRORS as err:
            quiet.warning(("handshake", type(err).__name__), "handshake failed: %s", err)
            return
        async with connection:
            await self.handle(connection)

    async def read(self, read: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A storage read: in a worker thread when the storage's reads block."""
        if not self.storage.blocking_reads:
            return read(*args, **kwargs)
        return await trio.to_thread.run_sync(partial(read, *args, **kwargs),
                                             limiter=self._read_limiter)

    async def envelopes_after(self, circle_id: bytes, mailbox: bytes, after: int, limit: int,
                               max_bytes: int) -> tuple[list[tuple[int, bytes]], bool]:
        return await self.read(self.storage.envelopes_after, circle_id, mailbox, after,
                                now=self.wall_clock(), limit=limit, max_bytes=max_bytes)

    async def expire(self) -> int:
        """Delete expired envelopes now; returns the bytes freed."""
        return await self.upkeep.expire()

    def used(self, circle_id: bytes) -> int:
        return self.upkeep.used(circle_id)

    @property
    def backup_bytes_received(self) -> int:  # backup and segment blobs stored (tests, benches)
        return self.requests.backup_bytes_received

    @property
    def purges(self) -> int:
        return self.upkeep.purges

    @property
    def advertise(self) -> str | None:
        return self.meetings.advertise

    @advertise.setter
    def advertise(self, address: str | None) -> None:
        self.meetings.advertise = address

    @property
    def rendezvous(self) -> dict[str, int]:
        """Offers waiting and pipes open, for status."""
        return self.rules.rendezvous_status

    @property
    def _live(self) -> set[Meeting[RelayConnection]]:  # tests look at the pipes' queues
        return self.rules.live

    @property
    def _buckets(self) -> dict[bytes, Any]:  # tests look at the shared rate counts
        return self.rules._buckets  # noqa: SLF001

    @property
    def connections(self) -> int:
        return sum(len(devices) for devices in self.rules.members.values())

    # -- one connection --

    async def handle(self, connection: SecureConnection) -> None:
        """Serve one device connection until it closes, misbehaves or is refused."""
        device = RelayConnection(connection=connection, key=connection.remote_static,
                                 source=_source_address(connection.stream))
        open_here = self._per_source.get(device.source, 0)
        try:
            self.admission.check_connection(open_here)
        except RelayError as err:
            self._refusals.note(err.code, device.source, trio.current_time())
            with trio.move_on_after(1):
                await connection.send(error_frame(None, err))
            return
        self._per_source[device.source] = open_here + 1
        try:
            async with trio.open_nursery() as nursery:
                device.scope = nursery.cancel_scope
                device.nursery = nursery
                nursery.start_soon(device.send_loop, self.envelopes_after)
                await self._serve_requests(device)
                # We end it (a fatal error, the deadline, a rendezvous that is over): what
                # is queued (the error saying why) goes first, then the sender stops.
                device.finish = True
                device.wakeup.set()
                await trio.sleep_forever()
            if device.overflowed:
                # It read nothing while its answers piled up: a frame may be half written.
                self._drops.note(QUEUE_FULL, device.source, trio.current_time())
                await trio.aclose_forcefully(connection.stream)
                return
            # Say why before the stream closes.
            await connection.aclose(device.close_reason or "closed by the relay")
        except* PeerClosed:
            pass
        except* CONNECTION_ERRORS as group:
            err = first_leaf(group)
            self._drops.note(cause_of(err), device.source, trio.current_time())
        except* StorageUnavailable as group:  # pushing failed: the device reconnects and resumes
            self._drops.note("storage unavailable", device.source, trio.current_time(),
                             str(first_leaf(group)))
        except* Exception as group:  # a bug in the relay ends this session, not the relay
            report_bug("relay-session", group)
        finally:
            left = self._per_source.get(device.source, 1) - 1
            if left > 0:
                self._per_source[device.source] = left
            else:
                self._per_source.pop(device.source, None)
            self.meetings.apply(self.rules.forget(device))

    async def _serve_requests(self, device: RelayConnection) -> None:
        with trio.move_on_after(REGISTER_TIMEOUT_S) as first_frame:
            message = await device.connection.receive()
        if first_frame.cancelled_caught:
            # Said before closing: a device that just missed the deadline learns why.
            device.close_reason = NOT_REGISTERED
            device.answer_nowait(error_frame(None, RelayError(
                NOT_REGISTERED, f"no relay.register within {REGISTER_TIMEOUT_S:g} s")))
            return
        while True:
            rid = request_id(message)
            try:
                await self._handle_request(device, message)
            except RelayError as err:
                device.answer_nowait(error_frame(rid, err))
                if self.rules.ends_connection(device, err):
                    if err.fatal:
                        self._refusals.note(err.code, device.source, trio.current_time(), err.message)
                    else:
                        log.debug("%r: join refused: %s", device.key, err)  # common: a typo
                    device.close_reason = err.code
                    return
            # Not held while the next one is awaited: a device idle after a 4 MiB segment_put
            # kept it in memory for as long as it stayed connected (issue 20).
            del message
            # Its next request waits while its answers queued hold MAX_QUEUED_BYTES: a
            # device pipelining large reads gets them at its own pace, in bounded memory.
            await device.wait_for_room()
            message = await device.connection.receive()

    async def _handle_request(self, device: RelayConnection, message: dict[str, Any]) -> None:
        if device.upstream is not None:  # a join passed on: the pipe is at another process
            if not is_pipe_frame(message):
                raise RelayError(NOT_REGISTERED, JOINER_ONLY)
            parse_request(message)  # checked here before it goes on
            await device.upstream.send(message)
            return
        if is_pipe_frame(message):
            await self.meetings.pipe(device, parse_request(message))
            return
        request = self.rules.accept(device, message, trio.current_time())
        try:
            await self._dispatch(device, request)
        except StorageUnavailable as err:
            quiet.warning(("storage", str(err)), "storage unavailable: %s", err)
            raise RelayError(INTERNAL, "the relay's storage is unavailable; retry later") from err

    async def _dispatch(self, device: RelayConnection, request: Request) -> None:
        await self.requests.dispatch(device, request)


def _source_address(stream: trio.abc.Stream) -> str:
    """The peer's IP address, for per-address limits ("unknown" for a non-socket stream)."""
    socket = getattr(stream, "socket", None)
    try:
        return str(socket.getpeername()[0]) if socket is not None else "unknown"
    except OSError:
        return "unknown"


__all__ = ["RelayServer"]


if __name__ == "__main__":  # `python -m meshd.relay.server`, the older spelling of the command
    import runpy

    runpy.run_module("meshd.relay.command", run_name="__main__", alter_sys=True)
