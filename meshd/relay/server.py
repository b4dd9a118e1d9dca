"""`meshd relay`: the trio server that stores and forwards envelopes it cannot read.

A device connects over meshd's Noise_XX channel (any static key may finish the handshake),
then registers with its circle's membership records. The relay verifies them, merges them
into the newest record set it holds for that circle, and from then on serves the
connection only while its static key is an active member: a registration that brings a
member's removal closes that member's open connections at once. Everything else is storage
with limits (protocol/relay.md): per-circle quota, envelope size cap, TTL, per-key rate.

Durability: a deposit is answered relay.ok only after its transaction committed. Writes go
through one writer task that batches every deposit waiting at that moment into a single
transaction in a worker thread (group commit), so the event loop keeps serving while SQLite
syncs, and a batch costs one fsync however many devices deposited.

Rendezvous (pairing through the relay, protocol/relay.md "Rendezvous"): a member offers a
nameplate, a device with no circle joins it on an unregistered connection, and the relay
then forwards relay.pipe frames between the two connections, in memory only. The pipe's
contents are the pairing handshake's Noise messages: the relay can read none of it, and
nothing of it reaches the storage.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import trio

from ..cmd.logsetup import configure_logging
from ..containment import report_bug
from ..excgroup import first_leaf
from ..identity import KeyFileError, ensure_private_dir, load_or_create_key
from ..net.tally import RefusalTally, cause_of
from ..net.transport import (
    CONNECTION_ERRORS,
    PeerClosed,
    SecureConnection,
    open_secure_connection,
    serve_secure,
)
from ..protocol.admission import ALLOW_LIST, MODES, Admission
from ..protocol.circle import Circle
from ..protocol.crypto import DHKeyPair, PublicKey, RandomSource, blake2b_256, short_key
from ..protocol.records import RecordRejected
from ..protocol.relay import (
    BAD_RECORDS,
    CONFLICT,
    INTERNAL,
    MAX_FETCH_BYTES,
    MAX_FETCH_ITEMS,
    MAX_PIPE_TOTAL_BYTES,
    MAX_SUBSCRIPTIONS,
    NAMEPLATE_IN_USE,
    NO_OFFER,
    NOT_A_MEMBER,
    NOT_REGISTERED,
    OFFER_EXPIRED,
    OFFER_TTL_S,
    PIPE_LIFETIME_S,
    RATE_LIMITED,
    RENDEZVOUS_BUSY,
    ROLE_JOIN,
    ROLE_OFFER,
    TOO_MANY_SUBSCRIPTIONS,
    Ack,
    BackupGet,
    BackupPut,
    Deposit,
    Fetch,
    Limits,
    PipeClose,
    PipeData,
    RecordsGet,
    Register,
    RelayError,
    Rendezvous,
    Request,
    SegmentDelete,
    SegmentGet,
    SegmentPut,
    Subscribe,
    TokenBucket,
    backup_frame,
    envelopes_frame,
    error_frame,
    ok_frame,
    parse_request,
    pipe_close_frame,
    pipe_frame,
    records_frame,
    records_push_frame,
    registered_frame,
    rendezvous_ready_frame,
    request_id,
    segment_frame,
)
from ..protocol.removal import removal_notice
from ..quietlog import QuietLogger
from .proxy import open_upstream, pump_upstream
from .storage import (
    DATABASE_FILE,
    PURGE_DEBOUNCE_S,
    NewEnvelope,
    RelayStorage,
    SQLiteRelayStorage,
    StorageEvent,
    StorageUnavailable,
)

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

T = TypeVar("T")

KEY_FILE = "relay.x25519"
# The relay's configuration key for --database, read from the environment (a systemd
# EnvironmentFile keeps a password off the command line).
DATABASE_ENV = "MESHD_RELAY_DATABASE"
# A connection must register (its first frame) within this long after the handshake.
REGISTER_TIMEOUT_S = 10.0
# A device that does not read what we send for this long is dropped (it holds our memory).
SEND_TIMEOUT_S = 30.0
EXPIRY_SWEEP_S = 300.0
# Storage reads in worker threads at once, for a storage whose reads block (PostgreSQL).
MAX_READ_THREADS = 8
# How often relay processes on a shared storage tell each other the requests each device
# key made (their rate limits count what a key did at every process, this late at most).
RATE_SHARE_S = 0.1
# Deposits of one connection waiting for their commit; past this the relay stops reading
# from that connection until some are answered (backpressure, bounded memory).
MAX_DEPOSITS_IN_FLIGHT = 128
# relay.pipe frames queued for one connection; past this the relay stops reading from the
# other end of the pipe until some are sent (at most 16 x 64 KiB per direction in memory).
MAX_PIPE_FRAMES_QUEUED = 16
PIPE_FRAME_TYPES = frozenset({"relay.pipe", "relay.pipe_close"})
# Verification steps one offer may cost (circle.py: one per record along a chain, the
# ancestor count for a record merging branches): a 4096-record chain with ~100 merges.
MAX_OFFER_COST = 400_000
SMALL_OFFER_RECORDS = 64
DEFAULT_LIMITS = Limits()
DEFAULT_ADMISSION = Admission()


class _Usage(dict[bytes, int]):
    """Stored bytes per circle, keeping their sum (the relay-wide cap checks it per deposit)."""

    def __init__(self, initial: dict[bytes, int]) -> None:
        super().__init__(initial)
        self.total = sum(initial.values())

    def __setitem__(self, circle_id: bytes, used: int) -> None:
        self.total += used - self.get(circle_id, 0)
        super().__setitem__(circle_id, used)


@dataclass(eq=False)
class _Device:
    """One connection and what the relay knows about it."""

    connection: SecureConnection
    key: PublicKey
    circle_id: bytes | None = None
    subscriptions: dict[bytes, int] = field(default_factory=dict)  # mailbox -> last id sent
    notify_only: set[bytes] = field(default_factory=set)  # subscriptions that get hints only
    scope: trio.CancelScope | None = None
    # What the sender task has to do: answers to send, and whether to read subscriptions.
    answers: list[dict[str, Any]] = field(default_factory=list)
    push_due: bool = False
    wakeup: trio.Event = field(default_factory=trio.Event)
    # Deposits queued for a commit or an answer; past MAX_DEPOSITS_IN_FLIGHT, reading this
    # connection waits for room (bounded memory for a device that sends and never reads).
    deposits_in_flight: int = 0
    room: trio.Event = field(default_factory=trio.Event)
    # Rendezvous: the source address (joins are rate-limited per address), this
    # connection's offer or pipe, and whether it joined without registering (then it may
    # use only that pipe, and is closed when the pipe ends).
    source: str = "unknown"
    nursery: trio.Nursery | None = None
    rendezvous: _Rendezvous | None = None
    joiner_only: bool = False
    # relay.pipe frames in `answers` not yet sent; the other end waits on pipe_room past
    # MAX_PIPE_FRAMES_QUEUED (a separate event: `room` is replaced by its own waiter).
    pipe_queued: int = 0
    pipe_room: trio.Event = field(default_factory=trio.Event)
    finish: bool = False  # close the connection once the queued frames are sent
    # The reason the relay's CLOSE carries when the relay ends the connection (channel.md:
    # CLOSE tells the peer why): the relay.error code that ended it, or what ended it.
    close_reason: str = ""
    # A join passed on to the relay process holding the offer (relay/proxy.py).
    upstream: SecureConnection | None = None

    def answer_nowait(self, frame: dict[str, Any]) -> None:
        self.answers.append(frame)
        self.wakeup.set()

    def push_nowait(self) -> None:
        self.push_due = True
        self.wakeup.set()

    async def send(self, frame: dict[str, Any]) -> None:
        try:
            with trio.fail_after(SEND_TIMEOUT_S):
                await self.connection.send(frame)
        except trio.TooSlowError:
            # A frame may be half written: nothing more can be said on this stream.
            await trio.aclose_forcefully(self.connection.stream)
            # Said in the error (a bare TooSlowError reads "dropped: " in the log, and its
            # quiet-log key would be shared with every other timeout's).
            raise trio.TooSlowError(f"it read nothing for {SEND_TIMEOUT_S:g} s") from None


@dataclass(eq=False)
class _Rendezvous:
    """One offer on a nameplate and, once a join consumed it, the pipe between the two."""

    nameplate: int
    offer: _Device
    offer_rid: int
    join: _Device | None = None
    piped_bytes: int = 0
    closed: bool = False
    # Offer expiry while it waits, then the pipe's lifetime; cancelled when it ends.
    timer: trio.CancelScope = field(default_factory=trio.CancelScope)
    claimed: bool = False  # recorded in a shared storage (released once consumed or ended)

    def other(self, device: _Device) -> _Device | None:
        return self.join if device is self.offer else self.offer


@dataclass(eq=False)
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    on_done: Callable[[_Pending], None] | None = None  # called in trio, instead of a waiter


class _Writer:
    """The one writer: runs storage writes in a worker thread, batching deposits."""

    def __init__(self, storage: RelayStorage) -> None:
        self._storage = storage
        self._deposits: list[tuple[NewEnvelope, _Pending]] = []  # in arrival order
        self._operations: list[tuple[Callable[[], Any], _Pending]] = []
        self._wakeup = trio.Event()
        self.batches = 0

    def deposit_nowait(self, item: NewEnvelope, on_done: Callable[[_Pending], None]) -> None:
        """Queue a deposit; on_done(pending) runs once it is committed (result: its id)
        or failed (error). No task per deposit: the relay's hot path."""
        self._deposits.append((item, _Pending(on_done=on_done)))
        self._wakeup.set()

    async def run(self, operation: Callable[[], T]) -> T:
        pending = _Pending()
        self._operations.append((operation, pending))
        return await self._wait(pending)  # type: ignore[no-any-return]

    async def _wait(self, pending: _Pending) -> Any:
        self._wakeup.set()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            deposits, self._deposits = self._deposits, []
            operations, self._operations = self._operations, []
            # Not cancellable: a write in flight finishes, then its waiters learn the result.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._apply, deposits, operations)
            self.batches += 1
            for _, pending in deposits + operations:  # type: ignore[operator]
                pending.done.set()
                if pending.on_done is not None:
                    pending.on_done(pending)

    def _apply(self, deposits: list[tuple[NewEnvelope, _Pending]],
               operations: list[tuple[Callable[[], Any], _Pending]]) -> None:
        # Runs in the worker thread. Exceptions are handed to the waiting task, which
        # raises them: a storage failure fails that request, never silently.
        if deposits:
            try:
                results = self._storage.add_envelopes([item for item, _ in deposits])
                for (_, pending), result in zip(deposits, results, strict=True):
                    pending.result = result
            except Exception as err:  # noqa: BLE001 - re-raised in each waiting task
                for _, pending in deposits:
                    pending.error = err
        for operation, pending in operations:
            try:
                pending.result = operation()
            except Exception as err:  # noqa: BLE001 - re-raised in the waiting task
                pending.error = err


class RelayServer:
    """The relay's logic over a storage and a clock; serve() puts it on listeners."""

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
        self._per_source: dict[str, int] = {}  # source address -> open connections
        # Refused or dropped connections: one line per cause per address per minute.
        self._refusals = RefusalTally(log, "connections")
        self._drops = RefusalTally(log, "connections", verb="dropped")
        self._wall_clock = wall_clock
        self._rng = rng
        self._writer = _Writer(storage)
        self._circles: dict[bytes, Circle] = {}
        self._known_records: dict[bytes, bytes] = {}  # encoded record -> its circle id
        self._used = _Usage(storage.usage())
        self.backup_bytes_received = 0  # backup and segment blobs stored (for tests and benches)
        self._devices: dict[bytes, set[_Device]] = {}  # circle id -> its open connections
        self._subscribers: dict[tuple[bytes, bytes], set[_Device]] = {}
        self._buckets: dict[bytes, TokenBucket] = {}
        self._join_buckets: dict[str, TokenBucket] = {}  # source address -> its joins
        self._offers: dict[int, _Rendezvous] = {}  # nameplate -> the offer waiting on it
        self._live: set[_Rendezvous] = set()  # offers and open pipes (status, tests)
        self._merge_lock = trio.Lock()
        self._purge_due = trio.Event()  # something was deleted: purge it from the files
        self.purges = 0
        self._read_limiter = trio.CapacityLimiter(MAX_READ_THREADS)
        # HOST:PORT the other relay processes on a shared storage reach this one at (set
        # by run_relay): offers held here are joinable there.
        self.advertise: str | None = None
        self._tasks: trio.Nursery | None = None
        self._rate_taken: dict[bytes, int] = {}  # requests per key not yet shared
        # One thread verifies large offers, another small ones: a stranger's 4,000 records
        # never make a typical circle (a few dozen records) wait behind them.
        self._verify_limiters = (trio.CapacityLimiter(1), trio.CapacityLimiter(1))
        for circle_id, records in storage.all_circle_records():
            try:
                self._remember(Circle.from_records(records))
            except RecordRejected as err:  # only if the database was altered
                log.error("stored records of circle %s do not verify (%s): ignoring them",
                          short_key(circle_id), err)

    # -- running --

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """The relay's own tasks (the writer, the expiry sweep), without listeners."""
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            await nursery.start(self._writer.serve)
            nursery.start_soon(self._sweep_periodically)
            nursery.start_soon(self._purge_when_due)
            if self.storage.shared:
                nursery.start_soon(self._follow_storage)
                nursery.start_soon(self._share_rates)
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

    async def _read(self, read: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A storage read: in a worker thread when the storage's reads block."""
        if not self.storage.blocking_reads:
            return read(*args, **kwargs)
        return await trio.to_thread.run_sync(partial(read, *args, **kwargs),
                                             limiter=self._read_limiter)

    async def _follow_storage(self) -> NoReturn:
        """Apply what other relay processes on the same storage changed."""
        events = getattr(self.storage, "events")  # noqa: B009 - shared storages only
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
        while True:
            await trio.sleep(RATE_SHARE_S)
            if not self._rate_taken:
                continue
            taken, self._rate_taken = self._rate_taken, {}
            try:
                await self._read(self.storage.share_rates, taken)
            except StorageUnavailable as err:
                quiet.warning(("storage", str(err)), "sharing rate counts failed: %s", err)

    async def apply_storage_event(self, event: StorageEvent) -> None:
        if event.kind == "rate":  # circle_id holds the device key here
            self._bucket(event.circle_id).debit(trio.current_time(), event.delta)
        elif event.kind == "deposit":
            self._used[event.circle_id] = self.used(event.circle_id) + event.delta
            for subscriber in self._subscribers.get((event.circle_id, event.mailbox), ()):
                subscriber.push_nowait()
        elif event.kind == "usage":
            self._used[event.circle_id] = max(0, self.used(event.circle_id) + event.delta)
        elif event.kind == "records":
            await self._reload_circle(event.circle_id)
        elif event.kind == "resync":  # events may have been missed: read everything again
            # (Deposits of ours in flight are missing from this count until they commit.)
            self._used = _Usage(await self._read(self.storage.usage))
            for circle_id, _ in await self._read(self.storage.all_circle_records):
                await self._reload_circle(circle_id)
            for subscribers in self._subscribers.values():
                for subscriber in subscribers:
                    subscriber.push_nowait()

    async def _reload_circle(self, circle_id: bytes) -> None:
        """Take the stored record set (another process merged into it)."""
        async with self._merge_lock:
            # Read under the lock: a merge of ours cannot land between the read and the
            # update, so the view never goes back to an older set.
            stored = await self._read(self.storage.circle_records, circle_id)
            if stored is None:
                return
            circle = Circle.from_records(stored)
            held = self._circles.get(circle_id)
            if held is not None and held.records() == circle.records():
                return
            self._remember(circle)
        await self._close_removed_members(circle_id)
        await self._push_records(circle_id)

    async def _sweep_periodically(self) -> NoReturn:
        while True:
            await trio.sleep(EXPIRY_SWEEP_S)
            await self.expire()

    async def _purge_when_due(self) -> NoReturn:
        """Deleted envelopes and replaced backups leave the storage's files within the
        bound of protocol/relay.md ("Purge"): one purge per PURGE_DEBOUNCE_S at most."""
        while True:
            await self._purge_due.wait()
            await trio.sleep(PURGE_DEBOUNCE_S)  # debounce: one purge for a burst of acks
            self._purge_due = trio.Event()
            try:
                done = await self._writer.run(self.storage.purge)
            except Exception as err:  # noqa: BLE001 - a storage failure: logged, retried
                log.error("purging deleted data from the storage failed: %s", err)
                done = False
            if done:
                self.purges += 1
            else:
                self._purge_due.set()  # a reader held the WAL: try again after the debounce

    async def expire(self) -> int:
        """Delete expired envelopes now; returns the bytes freed."""
        freed = await self._writer.run(lambda: self.storage.delete_expired(self._wall_clock()))
        for circle_id, size in freed.items():
            self._used[circle_id] = max(0, self._used.get(circle_id, 0) - size)
        if freed:
            self._purge_due.set()
        now = trio.current_time()
        for key in [k for k, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[key]
        for source in [s for s, bucket in self._join_buckets.items() if bucket.full(now)]:
            del self._join_buckets[source]
        return sum(freed.values())

    def used(self, circle_id: bytes) -> int:
        return self._used.get(circle_id, 0)

    @property
    def rendezvous(self) -> dict[str, int]:
        """Offers waiting and pipes open, for status."""
        pipes = sum(1 for r in self._live if r.join is not None)
        return {"offers": len(self._live) - pipes, "pipes": pipes}

    @property
    def connections(self) -> int:
        return sum(len(devices) for devices in self._devices.values())

    # -- one connection --

    async def handle(self, connection: SecureConnection) -> None:
        """Serve one device connection until it closes, misbehaves or is refused."""
        device = _Device(connection, connection.remote_static,
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
                nursery.start_soon(self._send_loop, device)
                await self._serve_requests(device)
                nursery.cancel_scope.cancel()
            # We end it (a fatal error, the deadline, a removal, a rendezvous that is over):
            # say why before the stream closes.
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
            self._forget(device)

    async def _serve_requests(self, device: _Device) -> None:
        with trio.move_on_after(REGISTER_TIMEOUT_S) as first_frame:
            message = await device.connection.receive()
        if first_frame.cancelled_caught:
            # Said before closing: a device that just missed the deadline learns why.
            device.close_reason = NOT_REGISTERED
            await device.send(error_frame(None, RelayError(
                NOT_REGISTERED, f"no relay.register within {REGISTER_TIMEOUT_S:g} s")))
            return
        while True:
            rid = request_id(message)
            try:
                await self._handle_request(device, message)
            except RelayError as err:
                await device.send(error_frame(rid, err))
                # A connection that joined without registering gets one attempt: after an
                # error (no-offer, rate-limited, ...) there is nothing left for it to do.
                if err.fatal:
                    self._refusals.note(err.code, device.source, trio.current_time(), err.message)
                    device.close_reason = err.code
                    return
                if device.joiner_only:
                    log.debug("%r: join refused: %s", device.key, err)  # common: a typo
                    device.close_reason = err.code
                    return
            message = await device.connection.receive()

    async def _handle_request(self, device: _Device, message: dict[str, Any]) -> None:
        if device.upstream is not None:  # a join passed on: the pipe is at another process
            if message.get("t") not in PIPE_FRAME_TYPES:
                raise RelayError(NOT_REGISTERED, "a connection that joined a rendezvous "
                                 "without registering may only use its pipe")
            parse_request(message)  # checked here before it goes on
            await device.upstream.send(message)
            return
        if message.get("t") in PIPE_FRAME_TYPES:
            # Not charged to the bucket: a pipe frame has no rid for a rate-limited answer.
            # The pipe is paced by its bounded queue and capped in bytes and lifetime.
            await self._pipe(device, parse_request(message))
            return
        wait = self._bucket(device.key).take(trio.current_time())
        if wait:
            raise RelayError(RATE_LIMITED, "too many requests", retry_after=round(wait, 3))
        if self.storage.shared:
            self._rate_taken[device.key] = self._rate_taken.get(device.key, 0) + 1
        request = parse_request(message)
        if device.joiner_only:
            raise RelayError(NOT_REGISTERED, "a connection that joined a rendezvous without "
                             "registering may only use its pipe")
        if (isinstance(request, Rendezvous) and request.role == ROLE_JOIN
                and device.circle_id is None):
            # A new device has no circle to register with: it may join, and only that.
            device.joiner_only = True
        elif not isinstance(request, Register):
            self._check_member(device)
        try:
            await self._dispatch(device, request)
        except StorageUnavailable as err:
            quiet.warning(("storage", str(err)), "storage unavailable: %s", err)
            raise RelayError(INTERNAL, "the relay's storage is unavailable; retry later") from err

    async def _dispatch(self, device: _Device, request: Request) -> None:
        match request:
            case Register():
                await self._register(device, request)
            case Deposit():
                await self._deposit(device, request)
            case Fetch(rid, mailbox, after, limit):
                assert device.circle_id is not None
                items, more = await self._read(
                    self.storage.envelopes_after, device.circle_id, mailbox, after,
                    now=self._wall_clock(), limit=limit, max_bytes=MAX_FETCH_BYTES)
                await device.send(envelopes_frame(rid, mailbox, items, more))
            case Ack(rid, mailbox, upto):
                circle_id = device.circle_id
                assert circle_id is not None
                freed = await self._writer.run(
                    lambda: self.storage.delete_through(circle_id, mailbox, upto))
                self._used[circle_id] = max(0, self._used.get(circle_id, 0) - freed)
                if freed:
                    self._purge_due.set()
                await device.send(ok_frame(rid))
            case Subscribe(rid, mailbox, after, notify):
                assert device.circle_id is not None
                if mailbox not in device.subscriptions and len(device.subscriptions) >= MAX_SUBSCRIPTIONS:
                    raise RelayError(TOO_MANY_SUBSCRIPTIONS, f"at most {MAX_SUBSCRIPTIONS} per connection")
                device.subscriptions[mailbox] = after
                if notify:
                    device.notify_only.add(mailbox)
                else:
                    device.notify_only.discard(mailbox)
                self._subscribers.setdefault((device.circle_id, mailbox), set()).add(device)
                await device.send(ok_frame(rid))
                device.push_nowait()
            case RecordsGet(rid):
                assert device.circle_id is not None
                await device.send(records_frame(rid, self._circles[device.circle_id].records()))
            case BackupGet(rid):
                assert device.circle_id is not None
                stored = await self._read(self.storage.backup, device.circle_id)
                await device.send(backup_frame(rid, stored.version if stored else 0,
                                               stored.blob if stored else None))
            case BackupPut():
                await self._backup_put(device, request)
            case SegmentPut():
                await self._segment_put(device, request)
            case SegmentGet(rid, segment_id):
                assert device.circle_id is not None
                blob = await self._read(self.storage.segment, device.circle_id, segment_id)
                await device.send(segment_frame(rid, segment_id, blob))
            case SegmentDelete(rid, ids):
                circle_id = device.circle_id
                assert circle_id is not None
                freed = await self._writer.run(lambda: self.storage.delete_segments(circle_id, ids))
                self._used[circle_id] = max(0, self.used(circle_id) - freed)
                if freed:
                    self._purge_due.set()  # the deleted segments' bytes
                await device.send(ok_frame(rid, freed=freed))
            case Rendezvous():
                if request.role == ROLE_OFFER:
                    await self._offer(device, request)
                else:
                    await self._join(device, request)

    async def _register(self, device: _Device, request: Register) -> None:
        if not request.records:
            circle = self._circle_of_member(device.key)
        else:
            circle = (self._circle_for(request.records)
                      or await self._merge(request.records, registrant=device))
        if device.circle_id is not None and device.circle_id != circle.circle_id:
            raise RelayError(BAD_RECORDS, "a connection serves one circle")
        device.circle_id = circle.circle_id
        if circle.state.member_by_dh(device.key) is None and (notice := removal_notice(circle, device.key)):
            await device.send(records_push_frame(notice))  # so it learns it was removed
        self._check_member(device)
        self._devices.setdefault(circle.circle_id, set()).add(device)
        log.debug("%r registered for circle %s", device.key, short_key(circle.circle_id))
        await device.send(registered_frame(request.rid, circle.circle_id, self.limits,
                                           self.used(circle.circle_id),
                                           self.storage.incarnation()))

    def _circle_of_member(self, key: bytes) -> Circle:
        """The one circle held whose active members include this X25519 key (recovery)."""
        found = [c for c in self._circles.values() if c.state.member_by_dh(key) is not None]
        if len(found) != 1:
            raise RelayError(NOT_A_MEMBER, "no circle here has this key as a member"
                             if not found else "this key is in several circles: send records")
        return found[0]

    def _circle_for(self, records: tuple[bytes, ...]) -> Circle | None:
        """The circle already held when it contains every record given (the common case)."""
        circle_id = self._known_records.get(records[0])
        if circle_id is None or any(self._known_records.get(r) != circle_id for r in records):
            return None
        return self._circles[circle_id]

    def _limiter_for(self, records: Sequence[bytes]) -> trio.CapacityLimiter:
        return self._verify_limiters[len(records) <= SMALL_OFFER_RECORDS]

    def _admit(self, records: tuple[bytes, ...]) -> None:
        """Before verifying: a new circle (no offered record is the genesis of one held)
        must be admitted. The circle id is the genesis record's hash, so this costs hashes."""
        if any(blake2b_256(r) in self._circles for r in records):
            return
        allowed = self.admission.allowed_circles
        offered = next((h for r in records if (h := blake2b_256(r)) in allowed), b"")
        self.admission.check_new_circle(offered, len(self._circles))

    async def _merge(self, records: tuple[bytes, ...], *,
                     registrant: _Device | None = None) -> Circle:
        self._admit(records)
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
            held = self._circles.get(circle_id)
            if held is None:
                stored = await self._read(self.storage.circle_records, circle_id)
                if stored is not None:
                    held = await trio.to_thread.run_sync(Circle.from_records, stored,
                                                         limiter=self._limiter_for(stored))
            if held is None:
                self.admission.check_new_circle(circle_id, len(self._circles))
            unchanged = held is not None and not (await trio.to_thread.run_sync(
                _merged, held, records, limiter=self._limiter_for(records)))[1]
            if held is not None and unchanged:
                self._remember(held)  # nothing new: no write
                merged, changed = held, False
            else:
                result: list[Circle] = []

                def merge(stored: list[bytes] | None) -> list[bytes] | None:
                    # In the writer's thread, inside the storage's read-modify-write: what
                    # another relay process on the same storage merged is never overwritten.
                    circle, new = (offered, True) if stored is None else _merged(
                        Circle.from_records(stored), records)
                    result.append(circle)
                    return circle.records() if new else None

                await self._writer.run(lambda: self.storage.update_circle_records(circle_id, merge))
                merged, changed = result[0], True
                self._remember(merged)
        if changed:
            await self._close_removed_members(circle_id)
            await self._push_records(circle_id, registrant)
        return merged

    async def _push_records(self, circle_id: bytes, registrant: _Device | None = None) -> None:
        """Tell the circle's other connected members the record set changed (a removal, a
        new epoch): a device that cannot reach the others learns it here, then finds its new
        epoch's mailbox. Not the registrant, registered already or not: it sent the change
        and asks relay.records for the merged set (protocol/relay.md)."""
        frame = records_push_frame(self._circles[circle_id].records())
        for device in list(self._devices.get(circle_id, ())):
            if device is registrant:
                continue
            with trio.move_on_after(1):
                try:
                    await device.connection.send(frame)
                except CONNECTION_ERRORS:
                    pass  # its own reader notices the broken connection

    def _remember(self, circle: Circle) -> None:
        self._circles[circle.circle_id] = circle
        for record in circle.records():
            self._known_records[record] = circle.circle_id

    async def _close_removed_members(self, circle_id: bytes) -> None:
        circle = self._circles[circle_id]
        for device in list(self._devices.get(circle_id, ())):
            if circle.state.member_by_dh(device.key) is None:
                log.info("%r is no longer a member: closing its connection", device.key)
                notice = removal_notice(circle, device.key)
                with trio.move_on_after(1):
                    try:
                        if notice:  # so it learns it was removed
                            await device.connection.send(records_push_frame(notice))
                        await device.connection.send(error_frame(
                            None, RelayError(NOT_A_MEMBER, "removed from the circle")))
                    except CONNECTION_ERRORS:
                        pass  # it is being closed either way
                self._forget(device)
                device.close_reason = NOT_A_MEMBER
                if device.scope is not None:
                    device.scope.cancel()

    def _check_member(self, device: _Device) -> None:
        if device.circle_id is None:
            raise RelayError(NOT_REGISTERED, "register first")
        circle = self._circles[device.circle_id]
        if circle.state.member_by_dh(device.key) is None:
            raise RelayError(NOT_A_MEMBER, "this key is not an active member of the circle")

    async def _deposit(self, device: _Device, request: Deposit) -> None:
        # Checked and queued here, in arrival order, without waiting for the commit: one
        # connection's pipelined deposits share group commits; _deposited answers each.
        circle_id = device.circle_id
        assert circle_id is not None
        size = len(request.envelope)
        self.limits.check_deposit(size, self.used(circle_id))
        self.admission.check_store(size, self._used.total)
        while device.deposits_in_flight + len(device.answers) >= MAX_DEPOSITS_IN_FLIGHT:
            device.room = trio.Event()
            await device.room.wait()
        device.deposits_in_flight += 1
        self._used[circle_id] = self.used(circle_id) + size  # reserved until the commit

        def deposited(pending: Any) -> None:
            device.deposits_in_flight -= 1
            device.room.set()
            if pending.error is not None:
                self._used[circle_id] -= size
                log.error("storing an envelope failed: %s", pending.error)
                device.answer_nowait(error_frame(request.rid, RelayError(
                    INTERNAL, "the relay could not store it; retry later")))
                return
            envelope_id = pending.result
            for subscriber in self._subscribers.get((circle_id, request.mailbox), ()):
                subscriber.push_nowait()
            device.answer_nowait(ok_frame(request.rid, id=envelope_id))

        self._writer.deposit_nowait(NewEnvelope(
            circle_id, request.mailbox, request.envelope, self._wall_clock() + self.limits.ttl_s),
            deposited)

    async def _backup_put(self, device: _Device, request: BackupPut) -> None:
        circle_id = device.circle_id
        assert circle_id is not None
        current = await self._read(self.storage.backup, circle_id)
        replaced = len(current.blob) if current else 0
        self.limits.check_backup(len(request.blob), self.used(circle_id), replaced)
        self.admission.check_store(len(request.blob) - replaced, self._used.total)
        conflict = await self._writer.run(lambda: self.storage.put_backup(
            circle_id, request.expected_version, request.version, request.blob))
        if conflict is not None:
            raise RelayError(CONFLICT, f"the stored backup is version {conflict.version}")
        self._used[circle_id] = self.used(circle_id) - replaced + len(request.blob)
        if replaced:
            self._purge_due.set()  # the superseded backup's bytes
        self.backup_bytes_received += len(request.blob)
        await device.send(ok_frame(request.rid, version=request.version))

    async def _segment_put(self, device: _Device, request: SegmentPut) -> None:
        circle_id = device.circle_id
        assert circle_id is not None
        size = len(request.blob)
        self.limits.check_segment(size, self.used(circle_id))
        self.admission.check_store(size, self._used.total)
        self._used[circle_id] = self.used(circle_id) + size  # reserved until the commit
        stored = False
        try:
            stored = await self._writer.run(lambda: self.storage.put_segment(circle_id, request.id, request.blob))
        finally:
            if not stored:
                self._used[circle_id] = max(0, self.used(circle_id) - size)
        if not stored:
            raise RelayError(CONFLICT, "a segment with this id is already stored")
        self.backup_bytes_received += size
        await device.send(ok_frame(request.rid))

    async def _send_loop(self, device: _Device) -> NoReturn:
        """Send queued answers, then subscribed mailboxes' new envelopes, read back from
        storage (so nothing committed is skipped)."""
        while True:
            await device.wakeup.wait()
            device.wakeup = trio.Event()
            while device.answers:
                answers, device.answers = device.answers, []
                for frame in answers:
                    await device.send(frame)
                    if frame["t"] == "relay.pipe":
                        device.pipe_queued -= 1
                        device.pipe_room.set()
                device.room.set()
            if device.finish:
                assert device.scope is not None
                device.scope.cancel()  # everything queued was sent, pipe_close included
                await trio.sleep_forever()
            if not device.push_due:
                continue
            device.push_due = False
            assert device.circle_id is not None
            for mailbox in list(device.subscriptions):
                if mailbox in device.notify_only:
                    await self._notify(device, mailbox)
                    continue
                more = True
                while more and mailbox in device.subscriptions:
                    items, more = await self._read(
                        self.storage.envelopes_after, device.circle_id, mailbox,
                        device.subscriptions[mailbox], now=self._wall_clock(),
                        limit=MAX_FETCH_ITEMS, max_bytes=MAX_FETCH_BYTES)
                    if not items:
                        break
                    device.subscriptions[mailbox] = items[-1][0]
                    await device.send(envelopes_frame(None, mailbox, items, more))

    async def _notify(self, device: _Device, mailbox: bytes) -> None:
        """A hint (relay.envelopes, no items, more) when an envelope is stored after the
        last one hinted at: the device fetches what it can take."""
        assert device.circle_id is not None
        items, _ = await self._read(
            self.storage.envelopes_after, device.circle_id, mailbox,
            device.subscriptions[mailbox], now=self._wall_clock(), limit=1, max_bytes=1)
        if items and mailbox in device.subscriptions:
            device.subscriptions[mailbox] = items[0][0]
            await device.send(envelopes_frame(None, mailbox, [], True))

    # -- rendezvous --

    @property
    def _shares_offers(self) -> bool:
        return self.storage.shared and self.advertise is not None

    async def _offer(self, device: _Device, request: Rendezvous) -> None:
        """Hold the offer until a join consumes it (no answer until then) or it expires."""
        if device.rendezvous is not None:
            raise RelayError(RENDEZVOUS_BUSY, "this connection already has a rendezvous")
        if request.nameplate in self._offers:
            raise RelayError(NAMEPLATE_IN_USE, f"nameplate {request.nameplate} has an offer")
        if self._shares_offers:  # one offer per nameplate across the relay's processes
            now = self._wall_clock()
            claimed = await self._read(self.storage.claim_nameplate, request.nameplate,
                                       self.advertise, now, now + OFFER_TTL_S)
            if not claimed or request.nameplate in self._offers or device.rendezvous:
                raise RelayError(NAMEPLATE_IN_USE, f"nameplate {request.nameplate} has an offer")
        rendezvous = _Rendezvous(request.nameplate, device, request.rid,
                                 claimed=self._shares_offers)
        rendezvous.timer.deadline = trio.current_time() + OFFER_TTL_S
        self._offers[request.nameplate] = device.rendezvous = rendezvous
        self._live.add(rendezvous)
        assert device.nursery is not None
        # In the offerer's nursery: the timer ends with the offerer's connection at the latest.
        device.nursery.start_soon(self._rendezvous_timer, rendezvous)
        log.debug("rendezvous %d: offered by %r", request.nameplate, device.key)

    async def _join(self, device: _Device, request: Rendezvous) -> None:
        if device.rendezvous is not None or device.upstream is not None:
            raise RelayError(RENDEZVOUS_BUSY, "this connection already has a rendezvous")
        # A sibling relay process passing a join on (the relay's own key, which only its
        # processes hold) was limited where the joiner connected.
        sibling = device.key == self.static.public
        # Popped at once: the first join consumes the offer; the inviter offers it again
        # when the pipe ends before an attempt (protocol/pairing.md).
        rendezvous = self._offers.pop(request.nameplate, None)
        if rendezvous is None and self._shares_offers and not sibling:
            held_at = await self._read(self.storage.nameplate_offered_at, request.nameplate,
                                       self._wall_clock())
            if held_at is not None and held_at != self.advertise:
                upstream = await open_upstream(held_at, request, self.static, self._rng)
                device.upstream = upstream
                assert device.nursery is not None
                device.nursery.start_soon(pump_upstream, device, upstream,
                                          MAX_PIPE_FRAMES_QUEUED)
                log.debug("rendezvous %d: join passed on to %s", request.nameplate, held_at)
                return
            rendezvous = self._offers.pop(request.nameplate, None)  # offered meanwhile
        if rendezvous is None:
            # Only a join that finds nothing (probing nameplates) costs its address a token:
            # one that finds an offer is paced by that offer, so a stranger probing from an
            # address never blocks a joiner there from the offer it was told about.
            wait = 0.0 if sibling else self._join_bucket(device.source).take(trio.current_time())
            if wait:
                raise RelayError(RATE_LIMITED, "too many joins", retry_after=round(wait, 3))
            raise RelayError(NO_OFFER, f"no offer waits on nameplate {request.nameplate}")
        self._release_offer(rendezvous)
        rendezvous.join = device
        device.rendezvous = rendezvous
        rendezvous.timer.deadline = trio.current_time() + PIPE_LIFETIME_S
        # Through the send queues, like the pipe frames that follow: never overtaken by them.
        rendezvous.offer.answer_nowait(rendezvous_ready_frame(rendezvous.offer_rid))
        device.answer_nowait(rendezvous_ready_frame(request.rid))
        log.debug("rendezvous %d: joined by %r", request.nameplate, device.key)

    async def _pipe(self, device: _Device, request: Request) -> None:
        rendezvous = device.rendezvous
        if rendezvous is None:
            if device.circle_id is None and not device.joiner_only:
                raise RelayError(NOT_REGISTERED, "register or join first")
            return  # the pipe just ended: the other side's close crossed this frame
        if isinstance(request, PipeClose):
            self._end_rendezvous(rendezvous, closer=device)
            return
        assert isinstance(request, PipeData)
        other = rendezvous.other(device)
        if other is None:
            return  # an offer still waiting has no pipe yet; nothing to forward to
        rendezvous.piped_bytes += len(request.data)
        if rendezvous.piped_bytes > MAX_PIPE_TOTAL_BYTES:
            log.info("rendezvous %d: pipe closed past %d bytes", rendezvous.nameplate,
                     MAX_PIPE_TOTAL_BYTES)
            self._end_rendezvous(rendezvous, closer=None)
            return
        # Backpressure: stop reading this side while the other side's queue is full.
        while other.pipe_queued >= MAX_PIPE_FRAMES_QUEUED and not rendezvous.closed:
            other.pipe_room = trio.Event()
            await other.pipe_room.wait()
        if rendezvous.closed:
            return
        other.pipe_queued += 1
        other.answer_nowait(pipe_frame(request.data))

    async def _rendezvous_timer(self, rendezvous: _Rendezvous) -> None:
        with rendezvous.timer:
            await trio.sleep_forever()
        if rendezvous.closed:
            return  # ended by a close or a disconnect, which cancelled the timer
        if rendezvous.join is None:
            log.debug("rendezvous %d: offer expired", rendezvous.nameplate)
            rendezvous.offer.answer_nowait(error_frame(rendezvous.offer_rid, RelayError(
                OFFER_EXPIRED, f"nobody joined within {OFFER_TTL_S:g} s")))
        else:
            log.info("rendezvous %d: pipe closed after %g s", rendezvous.nameplate,
                     PIPE_LIFETIME_S)
        self._end_rendezvous(rendezvous, closer=None)

    def _end_rendezvous(self, rendezvous: _Rendezvous, *, closer: _Device | None) -> None:
        """Withdraw the offer or close the pipe. The side that did not close it (closer:
        the side that sent pipe_close or went away; None: the relay) gets relay.pipe_close."""
        if rendezvous.closed:
            return
        rendezvous.closed = True
        rendezvous.timer.cancel()
        self._release_offer(rendezvous)
        self._live.discard(rendezvous)
        if self._offers.get(rendezvous.nameplate) is rendezvous:
            del self._offers[rendezvous.nameplate]
        for side in (rendezvous.offer, rendezvous.join):
            if side is None:
                continue
            if side.rendezvous is rendezvous:
                side.rendezvous = None
            side.pipe_room.set()  # a sender waiting for room sees the pipe closed
            if side is not closer and rendezvous.join is not None:
                side.answer_nowait(pipe_close_frame())
            if side.joiner_only:
                side.finish = True  # its one rendezvous is over
                side.close_reason = "rendezvous over"
                side.wakeup.set()

    def _release_offer(self, rendezvous: _Rendezvous) -> None:
        """Forget the offer's record in the shared storage (consumed or ended), in the
        background: nothing waits on it, and an unreleased record expires anyway."""
        if not rendezvous.claimed or self._tasks is None:
            return
        rendezvous.claimed = False

        async def release() -> None:
            try:
                await self._read(self.storage.release_nameplate, rendezvous.nameplate,
                                 self.advertise)
            except StorageUnavailable as err:
                log.info("rendezvous %d: releasing the nameplate failed (%s); it expires",
                         rendezvous.nameplate, err)

        self._tasks.start_soon(release)

    def _join_bucket(self, source: str) -> TokenBucket:
        bucket = self._join_buckets.get(source)
        if bucket is None:
            bucket = self._join_buckets[source] = TokenBucket(
                self.limits.join_rate_per_s, self.limits.join_burst, trio.current_time())
        return bucket

    def _bucket(self, key: bytes) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(
                self.limits.rate_per_s, self.limits.burst, trio.current_time())
        return bucket

    def _forget(self, device: _Device) -> None:
        if device.rendezvous is not None:
            self._end_rendezvous(device.rendezvous, closer=device)
        if device.circle_id is None:
            return
        self._devices.get(device.circle_id, set()).discard(device)
        for mailbox in device.subscriptions:
            subscribers = self._subscribers.get((device.circle_id, mailbox))
            if subscribers is not None:
                subscribers.discard(device)
                if not subscribers:
                    del self._subscribers[(device.circle_id, mailbox)]


def _merged(circle: Circle, records: tuple[bytes, ...]) -> tuple[Circle, bool]:
    """A copy of circle with records merged in (a failure leaves circle as it was), and
    whether that changed it."""
    copy = Circle.from_records(circle.records())
    try:
        return copy, bool(copy.merge(records, max_cost=MAX_OFFER_COST))
    except RecordRejected as err:
        raise RelayError(BAD_RECORDS, f"records do not merge ({err.reason})") from err


def _source_address(stream: trio.abc.Stream) -> str:
    """The peer's IP address, for per-address limits ("unknown" for a non-socket stream)."""
    socket = getattr(stream, "socket", None)
    try:
        return str(socket.getpeername()[0]) if socket is not None else "unknown"
    except OSError:
        return "unknown"



# ---- the command ---------------------------------------------------------------------


def relay_address(host: str, port: int, key: bytes) -> str:
    """HOST:PORT#KEY, the line devices put in their config (KEY: base64url, no padding)."""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}#{base64.urlsafe_b64encode(key).decode().rstrip('=')}"


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _public_address(text: str) -> tuple[str, int | None]:
    from .advertise import PublicAddressError, parse_public_address
    try:
        return parse_public_address(text)
    except PublicAddressError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.allow_circle and args.admission != ALLOW_LIST:
        parser.error("--allow-circle needs --admission allow-list")
    try:
        args.policy = Admission(args.admission, frozenset(args.allow_circle), args.max_circles,
                                args.max_total_bytes, args.max_connections_per_source)
    except ValueError as err:
        parser.error(str(err))
    return args


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """`meshd relay`'s options (meshd's man page and completions are generated from it)."""
    defaults = Limits()
    parser = argparse.ArgumentParser(prog="meshd relay", description="run a meshd relay",
                                     add_help=add_help)
    parser.add_argument("--state-dir", type=Path, required=True,
                        help="the relay's key (relay.x25519) and, without --database, its "
                             "SQLite database; relay processes sharing one database share "
                             "this key file")
    parser.add_argument("--database", default=os.environ.get(DATABASE_ENV) or None,
                        metavar="postgresql://...",
                        help="store in this PostgreSQL database instead (several relay "
                             f"processes may share it; default: ${DATABASE_ENV}, else SQLite "
                             "in the state directory)")
    parser.add_argument("--listen", type=_listen_address, default=("0.0.0.0", 7744),
                        help="HOST:PORT (port 0: any free port; default 0.0.0.0:7744)")
    parser.add_argument("--public-address", type=_public_address, default=None,
                        metavar="HOST[:PORT]",
                        help="the name or address devices dial, printed in HOST:PORT#KEY "
                        "(default: the --listen host, or this machine's FQDN when listening on "
                        "every address; the port defaults to the one listened on)")
    parser.add_argument("--advertise", type=_listen_address, default=None, metavar="HOST:PORT",
                        help="with --database: where the other relay processes reach this one "
                             "(a join there for an offer held here is passed on; default: the "
                             "--listen host, 127.0.0.1 for a wildcard, and the bound port)")
    parser.add_argument("--quota-bytes", type=int, default=defaults.quota_bytes)
    parser.add_argument("--max-envelope-bytes", type=int, default=defaults.max_envelope_bytes)
    parser.add_argument("--ttl-seconds", type=int, default=defaults.ttl_s)
    parser.add_argument("--rate", type=float, default=defaults.rate_per_s,
                        help="requests per second per device key")
    parser.add_argument("--burst", type=float, default=defaults.burst)
    admission = Admission()
    parser.add_argument("--admission", choices=MODES, default=admission.mode,
                        help="open: anyone may add a circle (within the caps); allow-list: only "
                        "the circles given with --allow-circle")
    parser.add_argument("--allow-circle", action="append", type=_circle_id, default=[],
                        metavar="CIRCLE_ID", help="a circle id (base64url) admitted in allow-list mode")
    parser.add_argument("--max-circles", type=int, default=admission.max_circles)
    parser.add_argument("--max-total-bytes", type=int, default=admission.max_total_bytes)
    parser.add_argument("--max-connections-per-source", type=int,
                        default=admission.max_connections_per_source)
    parser.add_argument("--log-level", default="info")
    return parser


def _circle_id(text: str) -> bytes:
    try:
        value = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        value = b""
    if len(value) != 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a base64url circle id (32 bytes)")
    return value


async def run_relay(args: argparse.Namespace) -> None:
    ensure_private_dir(args.state_dir)
    static = DHKeyPair.from_private_bytes(load_or_create_key(args.state_dir / KEY_FILE, "x25519"))
    limits = Limits(quota_bytes=args.quota_bytes, max_envelope_bytes=args.max_envelope_bytes,
                    ttl_s=args.ttl_seconds, rate_per_s=args.rate, burst=args.burst)
    storage = open_storage(args)
    try:
        host, port = args.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound_port = listeners[0].socket.getsockname()[1]
        server = RelayServer(storage, static, limits=limits, admission=args.policy)
        if storage.shared:
            advertise_host, advertise_port = args.advertise or (
                "127.0.0.1" if host in ("0.0.0.0", "::", "") else host, bound_port)
            server.advertise = (f"[{advertise_host}]:{advertise_port}" if ":" in advertise_host
                                else f"{advertise_host}:{advertise_port}")
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, listeners)
                from .advertise import advertised, is_unspecified
                public_host, public_port = advertised(host, bound_port, args.public_address)
                if args.public_address is None and is_unspecified(host):
                    log.warning("listening on every address: devices are told %s; if they cannot "
                                "reach that name, pass --public-address HOST[:PORT]", public_host)
                print(relay_address(public_host, public_port, static.public), flush=True)
                log.info("relay listening on %s:%d", host, bound_port)
                from .. import sdnotify
                sdnotify.ready(f"listening on {host}:{bound_port}")
                async for _ in signals:
                    log.info("SIGTERM: stopping")
                    nursery.cancel_scope.cancel()
                    break
    finally:
        storage.close()


class DatabaseError(Exception):
    """--database names something the relay cannot use."""


def open_storage(args: argparse.Namespace) -> RelayStorage:
    if args.database is None:
        return SQLiteRelayStorage(args.state_dir / DATABASE_FILE)
    if not args.database.startswith(("postgresql://", "postgres://")):
        raise DatabaseError("--database takes a postgresql:// URL")
    try:
        from .postgres import PostgresStorageError, open_postgres
    except ImportError as err:
        raise DatabaseError(f"the PostgreSQL backend needs psycopg ({err}): "
                            "pip install 'meshd[postgres]'") from None
    try:
        return open_postgres(args.database)
    except PostgresStorageError as err:
        raise DatabaseError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        trio.run(run_relay, args)
    except (KeyFileError, DatabaseError) as err:
        print(f"meshd relay: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except OSError as err:
        print(f"meshd relay: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["RelayServer", "main", "relay_address"]
