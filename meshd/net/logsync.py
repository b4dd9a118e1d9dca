"""The daemon's handle on message logs (LogService) and the trio driver of sync (PeerSync).

LogService owns this device's log: it turns app writes into signed entries and commits
them before returning (synchronous=FULL; concurrent writes share one transaction and run
in a worker thread, see groupcommit.py), answers reads from the materialised view, and
verifies-then-commits batches from peers (ingest). Every commit wakes the PeerSyncs, so a
new entry, local or received, is pushed to every connected peer that lacks it within one
scheduler pass.

PeerSync is the thin trio shell around protocol.sync.SyncSession for one connection: run()
sends our hello, then streams batches while the session has credit and something the peer
lacks, sleeping on a wakeup event until the next commit, credit or the stall deadline;
handle() feeds received 'log.*' messages in. SQLite calls run in the trio thread: a batch
commit takes a few milliseconds, and keeping one thread keeps the store free of locks.

Failure contract: handle() and run() raise EntryRejected (a RemoteProtocolError) when the
peer sent bad entries or stalled; the caller closes that connection. StoreError means our
disk failed and propagates as it is.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, Protocol

import trio

from ..excgroup import first_leaf
from ..identity import fingerprint
from ..protocol.crypto import SigningKeyPair
from ..protocol.log import (
    CLEAR,
    DELETE,
    PUT,
    Batch,
    EntryRejected,
    Header,
    InvalidRequest,
    VerifiedBatch,
    Write,
    adoptable_hlc,
    auto_record_id,
    batch_size,
    compose_batch,
    hlc_limit,
    next_hlc,
    verify_batch,
)
from ..protocol.sync import (
    BATCH_BYTES,
    STALL_TIMEOUT_S,
    WINDOW_BYTES,
    BatchReceived,
    State,
    SyncSession,
)
from ..quietlog import QuietLogger
from ..store.db import Store
from ..store.groupcommit import GroupCommit

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

MAX_READ_LIMIT = 1000
BULK_CHUNK_ENTRIES = 10_000
PIPELINE_CHUNK_ENTRIES = 1000


class CommitSignal:
    """Something to await new commits: `generation` counts them; wait(seen) returns once
    it has moved past `seen`."""

    def __init__(self) -> None:
        self.generation = 0
        self._event = trio.Event()

    def fire(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = trio.Event()

    async def wait(self, seen: int) -> int:
        while self.generation == seen:
            await self._event.wait()
        return self.generation


class LogService:
    def __init__(self, store: Store, signer: SigningKeyPair, wall_ms: Callable[[], int]) -> None:
        self.store = store
        self._signer = signer
        self.author = bytes(signer.public)
        self._wall_ms = wall_ms
        self.changed = CommitSignal()
        self._peers: set[PeerSync] = set()
        # Our clock never runs behind our own chain, nor behind other authors' entries within
        # the drift bound; one past it (stored by an older meshd) must not block local writes.
        self._hlc = 0
        for author in store.version_vector():
            header = store.last_header(author)
            if header is not None:
                stored = Header.decode(header).hlc
                if author == self.author or adoptable_hlc(stored, self._wall_ms()):
                    self._hlc = max(self._hlc, stored)
        self.group_commit: GroupCommit[VerifiedBatch] = GroupCommit(
            self._compose_and_commit, lambda _batch: self._committed())

    # -- local writes --

    async def write(self, stream: str, record_id: str | None, body: bytes) -> dict[str, Any]:
        """Append a put; returns once committed. Raises InvalidRequest, StoreError."""
        return (await self.submit([checked_write(PUT, stream, record_id, body)]))[0]

    async def delete(self, stream: str, record_id: str) -> dict[str, Any]:
        return (await self.submit([checked_write(DELETE, stream, record_id)]))[0]

    async def clear(self, stream: str) -> dict[str, Any]:
        """Hide every record of stream that orders at or before now."""
        return (await self.submit([checked_write(CLEAR, stream, "")]))[0]

    async def submit(self, writes: Sequence[Write]) -> list[dict[str, Any]]:
        """Commit writes (from checked_write) in the next group commit, all or none; returns
        one result per write once durable. Raises InvalidRequest, StoreError."""
        batch, first = await self._submit(writes)
        return [self._result(batch, i) for i in range(first, first + len(writes))]

    async def submit_ids(self, writes: Sequence[Write]) -> list[tuple[str, int]]:
        """submit(), answering only (record id, seq) per write: the batch route's answer."""
        batch, first = await self._submit(writes)
        return list(zip(batch.record_ids[first:first + len(writes)],
                        range(batch.first_seq + first, batch.first_seq + first + len(writes)),
                        strict=True))

    async def _submit(self, writes: Sequence[Write]) -> tuple[VerifiedBatch, int]:
        writes = [w if isinstance(w, CheckedWrite) else
                  checked_write(w.op, w.stream, w.record_id or None, w.body) for w in writes]
        return await self.group_commit.submit(writes)

    def _compose_and_commit(self, writes: list[Write]) -> VerifiedBatch:
        """Read the tip, compose and commit as one step under the store's write lock (runs
        in the group commit's worker thread); a put without a record id gets one here."""
        with self.store.write_lock:
            seq, hash = self.store.tip(self.author)
            hlc, wall = self._hlc, self._wall_ms()
            if any(w.op == PUT and not w.record_id for w in writes):
                writes = list(self._with_ids(writes, hlc, wall))
            # Every write is a CheckedWrite (submit made sure); _with_ids only adds fresh ids.
            batch = compose_batch(self._signer, seq, hash, hlc, wall, writes, checked=True)
            self.store.commit_batch(batch, durable=True)
            self._hlc = max(self._hlc, batch.max_hlc)
        return batch

    def _with_ids(self, writes: list[Write], hlc: int, wall: int) -> Iterator[Write]:
        for write in writes:
            hlc = next_hlc(hlc, wall)  # the same sequence compose_batch will assign
            if write.op == PUT and not write.record_id:
                write = dataclasses.replace(write, record_id=auto_record_id(hlc, self.author))
            yield write

    def _result(self, batch: VerifiedBatch, i: int) -> dict[str, Any]:
        return {"stream": batch.streams[i], "id": batch.record_ids[i], "author": self.author.hex(),
                "seq": batch.first_seq + i, "hlc": int.from_bytes(batch.orders[i][:8], "big")}

    def write_nowait(self, stream: str, record_id: str | None, body: bytes) -> dict[str, Any]:
        if record_id is None:
            record_id = auto_record_id(next_hlc(self._hlc, self._wall_ms()), self.author)
        return self._commit_local([Write(stream, record_id, PUT, body)])[0]

    async def write_many(
        self, writes: Iterable[tuple[str, str | None, bytes]],
        *, chunk_entries: int = PIPELINE_CHUNK_ENTRIES,
    ) -> int:
        """Many puts, committed chunk by chunk; between chunks connected peers already
        receive what committed, so a burst reaches them while it is still being written."""
        total = 0
        items = iter(writes)
        while chunk := list(islice(items, chunk_entries)):
            total += self.write_many_nowait(chunk, chunk_entries=chunk_entries)
            await trio.lowlevel.checkpoint()
        return total

    def write_many_nowait(
        self, writes: Iterable[tuple[str, str | None, bytes]],
        *, chunk_entries: int = BULK_CHUNK_ENTRIES,
    ) -> int:
        """Bulk puts (imports, benchmarks): one transaction and a few signatures per chunk.
        Returns the number written; each chunk is durable once committed."""
        total = 0
        items = iter(writes)
        while chunk := list(islice(items, chunk_entries)):
            self._commit_local(list(self._puts(chunk)), results=False)
            total += len(chunk)
        return total

    def _puts(self, chunk: list[tuple[str, str | None, bytes]]) -> Iterator[Write]:
        hlc, wall = self._hlc, self._wall_ms()
        for stream, record_id, body in chunk:
            hlc = next_hlc(hlc, wall)  # the same sequence compose_batch will assign
            yield Write(stream, record_id or auto_record_id(hlc, self.author), PUT, body)

    def _commit_local(self, writes: list[Write], *, results: bool = True) -> list[dict[str, Any]]:
        with self.store.write_lock:
            seq, hash = self.store.tip(self.author)
            batch = compose_batch(self._signer, seq, hash, self._hlc, self._wall_ms(), writes)
            self.store.commit_batch(batch, durable=True)
            self._hlc = max(self._hlc, batch.max_hlc)
        self._committed()
        return [self._result(batch, i) for i in range(len(writes))] if results else []

    # -- reads --

    def read(self, stream: str, *, after: str | None = None, limit: int = 100) -> dict[str, Any]:
        """Live records of stream in view order: {"records": [...], "next": cursor|None}.
        Each record: id, author (hex), seq, hlc, body (bytes). Raises InvalidRequest."""
        try:
            after_key = bytes.fromhex(after) if after else b""
        except ValueError:
            raise InvalidRequest("malformed cursor") from None
        limit = max(1, min(int(limit), MAX_READ_LIMIT))
        rows = self.store.read(stream, after_key, limit + 1)
        records = [
            {"id": record_id, "author": order[8:40].hex(),
             "seq": int.from_bytes(order[40:48], "big"),
             "hlc": int.from_bytes(order[:8], "big"), "body": body}
            for order, record_id, body in rows[:limit]
        ]
        return {"records": records, "next": rows[limit - 1][0].hex() if len(rows) > limit else None}

    def streams(self) -> list[dict[str, Any]]:
        return [{"stream": name, "records": count} for name, count in self.store.streams()]

    def version_vector(self) -> dict[bytes, int]:
        return self.store.version_vector()

    # -- sync --

    def ingest(self, batch: dict[str, Any], is_author_allowed: Callable[[bytes], bool]) -> int:
        """Verify and commit one 'log.entries' message; returns the number of new entries.
        Raises EntryRejected (nothing committed) or StoreError."""
        return self.ingest_batch(Batch.from_message(batch), is_author_allowed)

    def ingest_batch(self, batch: Batch, is_author_allowed: Callable[[bytes], bool]) -> int:
        with self.store.write_lock:  # the tip must not move between reading and committing
            seq, hash = self.store.tip(batch.author)
            verified = verify_batch(batch, seq, hash, is_author_allowed,
                                    hlc_bound=hlc_limit(self._wall_ms()))
            if not len(verified):
                return 0
            self.store.commit_batch(verified, durable=False)
            # Under the lock: the group commit's thread reads and advances _hlc under it too.
            if verified.max_hlc > self._hlc and adoptable_hlc(verified.max_hlc, self._wall_ms()):
                self._hlc = verified.max_hlc
        self._committed()
        return len(verified)

    def batch_since(self, author: bytes, after_seq: int, max_bytes: int) -> dict[str, Any] | None:
        return self.store.batch_since(author, after_seq, max_bytes)

    def peer(
        self,
        send: Callable[[dict[str, Any]], Awaitable[None]],
        is_author_allowed: Callable[[bytes], bool],
        *,
        name: str = "peer",
        stall_timeout_s: float = STALL_TIMEOUT_S,
        window_bytes: int = WINDOW_BYTES,
        batch_bytes: int = BATCH_BYTES,
    ) -> PeerSync:
        return PeerSync(self, send, is_author_allowed, name=name, stall_timeout_s=stall_timeout_s,
                        window_bytes=window_bytes, batch_bytes=batch_bytes)

    def _committed(self) -> None:
        self.changed.fire()
        for peer in self._peers:
            peer.wake()


class PeerSync:
    """Sync with one connected peer. Start run() in a task; pass every received 'log.*'
    message to handle(). Either raises EntryRejected when the peer misbehaves."""

    def __init__(
        self,
        service: LogService,
        send: Callable[[dict[str, Any]], Awaitable[None]],
        is_author_allowed: Callable[[bytes], bool],
        *,
        name: str,
        stall_timeout_s: float,
        window_bytes: int,
        batch_bytes: int,
    ) -> None:
        self._service = service
        self._send = send
        self._allowed = is_author_allowed
        self.name = name
        self._session = SyncSession(now=trio.current_time(), stall_timeout_s=stall_timeout_s,
                                    window_bytes=window_bytes, batch_bytes=batch_bytes)
        self._wakeup = trio.Event()
        self.entries_received = 0

    @property
    def behind(self) -> int:
        """Entries the peer said it has that we still lack."""
        return self._session.behind(self._vector())

    @property
    def peer_confirmed(self) -> dict[bytes, int]:
        """Per author, the seq the peer said it had (its hello): what the relay path may skip.
        Batches sent since are not counted: they may have been lost with the connection."""
        return dict(self._session.peer_claims)

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        """Hello, then stream what the peer lacks, then push new entries as they commit.
        Returns never; raises EntryRejected('stalled') for a peer that stops sending."""
        self._service._peers.add(self)  # noqa: SLF001 - the service wakes its peers
        try:
            if not self._session.started:
                self._session.start(self._vector(), trio.current_time())
            while True:
                await self._flush()  # what handle() left to say (credit, hello answers)
                await self._send_what_the_peer_lacks()
                with trio.move_on_at(self._session.deadline(self._vector())):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                if self._session.state is State.ERROR:
                    return  # handle() rejected the peer's input and raised: the connection ends
                self._session.handle_timeout(self._vector(), trio.current_time())
        except EntryRejected as err:
            quiet.warning(("log", err.reason), "%s: log sync failed: %s", self.name, err)
            raise
        finally:
            self._service._peers.discard(self)  # noqa: SLF001

    async def handle(self, message: dict[str, Any]) -> None:
        """One received 'log.*' message. Raises EntryRejected (nothing of it committed).

        Never sends: what the message calls for is sent by run(), so the task that reads a
        connection never waits on a peer that does not read (full duplex)."""
        now = trio.current_time()
        event = None
        try:
            event = self._session.receive(message, now)
            if isinstance(event, BatchReceived):
                batch = event.batch
                self.entries_received += self._service.ingest_batch(batch, self._allowed)
                self._session.batch_committed(batch.author, batch.head.seq, batch.size, now)
        except EntryRejected as err:
            if err.reason == "clock-ahead" and isinstance(event, BatchReceived):
                # Not the peer's fault (it may only forward them): that author's later
                # entries wait for a later session; everything else keeps flowing.
                self._session.batch_refused(event.batch.author, event.batch.size, now)
                quiet.warning(("log", err.reason, event.batch.author),
                              "%s: entries of %s refused: %s", self.name,
                              fingerprint(event.batch.author), err)
            else:
                self._session.fail()
                quiet.warning(("log", err.reason), "%s sent bad log entries: %s", self.name, err)
                raise
        self.wake()
        await trio.lowlevel.checkpoint()

    async def _send_what_the_peer_lacks(self) -> None:
        session = self._session
        while (request := session.next_send(self._vector())) is not None:
            author, after = request
            message = self._service.batch_since(author, after, session.batch_bytes)
            if message is None:  # pragma: no cover - the vector said we have more
                return
            size = batch_size(message["headers"], message["bodies"])
            session.batch_sent(author, message["head"]["seq"], size)
            log.debug("%s: sending %d entries of %s", self.name, len(message["headers"]),
                      fingerprint(author))
            await self._send(message)
            await self._flush()

    async def _flush(self) -> None:
        for message in self._session.messages_to_send():
            await self._send(message)

    def _vector(self) -> dict[bytes, int]:
        return {a: s for a, s in self._service.version_vector().items() if self._allowed(a)}


@dataclasses.dataclass(frozen=True, slots=True)
class CheckedWrite(Write):
    """A Write whose check() passed (only checked_write makes them); record_id "" on a put
    asks for a fresh id."""


def checked_write(op: int, stream: str, record_id: str | None, body: bytes = b"") -> CheckedWrite:
    """A write for LogService.submit; record_id None (puts only) asks for a fresh id.
    Raises InvalidRequest now, so one bad write never fails a group it would have joined."""
    if record_id is None and op != PUT:
        raise InvalidRequest("a record id is required")
    Write(stream, "x" if record_id is None else record_id, op, body).check()
    return CheckedWrite(stream, record_id or "", op, body)


class LogConnection(Protocol):
    async def send(self, message: dict[str, Any]) -> None: ...
    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...


async def sync_over(
    connection: LogConnection,
    service: LogService,
    is_author_allowed: Callable[[bytes], bool],
    **options: Any,
) -> None:
    """Sync over a connection that carries only 'log.*' messages until the peer closes it
    (tools, benchmarks, tests; the daemon dispatches other types too). Raises the first
    failure of either direction as itself, not wrapped in an ExceptionGroup."""
    peer = service.peer(connection.send, is_author_allowed, **options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run)
            async for message in connection:
                await peer.handle(message)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise first_leaf(group) from None

