"""The trio driver of log sync for one connection (PeerSync), and sync_over for connections
that carry only 'log.*' messages.

PeerSync is the thin trio shell around protocol.sync.SyncSession: run() sends our hello,
then streams batches while the session has credit and something the peer lacks, sleeping
on a wakeup event until the next commit, credit or the stall deadline; handle() feeds
received 'log.*' messages in. A catch-up batch is verified and committed in worker threads,
so the trio thread keeps serving the API, channels and timers while SQLite inserts; batch
n+1 is verified while batch n commits (receivepipe.py: handle() returns once its batch is
verified and the batch before it committed). A live push (a small batch) is verified, and
committed when the store's write lock is free, on the trio thread: a thread hop would cost
more than the work. The session grants
a batch's credit back only once it is committed, so a peer can never have more than its
window waiting on our disk.

Failure contract: handle() and run() raise EntryRejected (a RemoteProtocolError) when the
peer sent bad entries or stalled; the caller closes that connection. StoreError means our
disk failed and propagates as it is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import trio

from ..excgroup import first_leaf
from ..identity import fingerprint
from ..protocol.log import Batch, EntryRejected, batch_size
from ..protocol.sync import BatchReceived, State, SyncSession
from ..quietlog import QuietLogger
from .receivepipe import PipelineHost, ReceivePipeline

log = logging.getLogger("meshd.net.logsync")  # the name these lines were logged under
quiet = QuietLogger(log)


class SyncHost(PipelineHost, Protocol):
    """What a PeerSync needs of the log service (LogService is the one implementation)."""

    peers: set[PeerSync]
    author: bytes  # this device's: its entries are pushed at once, never held (log.have)
    vector_version: int  # moves whenever version_vector() or who may author may change

    def version_vector(self) -> dict[bytes, int]: ...
    def committed(self, source: PeerSync | None = None) -> None: ...
    def batch_since(self, author: bytes, after_seq: int, max_bytes: int) -> dict[str, Any] | None: ...
    async def receive(self, batch: Batch, is_author_allowed: Callable[[bytes], bool], *,
                      source: PeerSync | None = None) -> int: ...
    def peer(self, send: Callable[[dict[str, Any]], Awaitable[None]],
             is_author_allowed: Callable[[bytes], bool], **options: Any) -> PeerSync: ...


class PeerSync:
    """Sync with one connected peer. Start run() in a task; pass every received 'log.*'
    message to handle(). Either raises EntryRejected when the peer misbehaves."""

    def __init__(
        self,
        service: SyncHost,
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
                                    window_bytes=window_bytes, batch_bytes=batch_bytes,
                                    own=service.author)
        self._wakeup = trio.Event()
        self.entries_received = 0
        self._filtered: tuple[int, dict[bytes, int]] | None = None  # (vector_version, vector)
        self._pipeline = ReceivePipeline(service, self._batch_done, self._commit_failed)
        self._failure: BaseException | None = None  # what a received batch's commit raised

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
        self._service.peers.add(self)  # the service wakes its peers on every commit
        try:
            if not self._session.started:
                self._session.start(self._vector(), trio.current_time())
            while True:
                await self._flush()  # what handle() left to say (credit)
                await self._send_what_the_peer_lacks()
                self._session.announce(self._vector(), trio.current_time())
                await self._flush()  # a log.have, if one is due
                deadline = self._session.deadline(self._vector())
                if deadline == math.inf:  # (no cancel scope per pass when there is no deadline)
                    await self._wakeup.wait()
                else:
                    with trio.move_on_at(deadline):
                        await self._wakeup.wait()
                self._wakeup = trio.Event()
                self._raise_failure()  # a received batch's commit failed
                if self._session.state is State.ERROR:
                    return  # handle() rejected the peer's input and raised: the connection ends
                self._session.handle_timeout(self._vector(), trio.current_time())
        except EntryRejected as err:
            quiet.warning(("log", err.reason), "%s: log sync failed: %s", self.name, err)
            raise
        finally:
            self._service.peers.discard(self)
            with trio.CancelScope(shield=True):  # (as long as one commit: bounded)
                await self._pipeline.drain()  # a received batch committing lands first

    async def handle(self, message: dict[str, Any]) -> None:
        """One received 'log.*' message. Raises EntryRejected (nothing of it committed).

        Never sends: what the message calls for is sent by run(), so the task that reads a
        connection never waits on a peer that does not read (full duplex)."""
        now = trio.current_time()
        event = None
        try:
            self._raise_failure()
            event = self._session.receive(message, now)
            if isinstance(event, BatchReceived):
                # Returns once the batch is verified and the one before it committed; its
                # own commit runs while the next message is read (receivepipe.py).
                await self._pipeline.receive(event.batch, self._allowed)
                self._raise_failure()  # (the commit before it failed)
        except EntryRejected as err:
            await self._pipeline.drain()  # the batches before it still commit
            self._raise_failure()
            if err.reason in ("clock-ahead", "past-removal") and isinstance(event, BatchReceived):
                # Not the peer's fault (it may only forward them): that author's later
                # entries wait for a later session (or never count, past a removal);
                # everything else keeps flowing.
                self._session.batch_refused(event.batch.author, event.batch.size, now)
                quiet.warning(("log", err.reason, event.batch.author),
                              "%s: entries of %s refused: %s", self.name,
                              fingerprint(event.batch.author), err)
            else:
                self._session.fail()
                quiet.warning(("log", err.reason), "%s sent bad log entries: %s", self.name, err)
                raise
        # run() acts on a hello or credit, or to send what the session queued (credit). A
        # batch or a log.have from the peer only tells us what it holds: nothing to send it
        # (and a commit wakes the other peers, not this one).
        if self._session.has_output or message.get("t") not in ("log.entries", "log.have"):
            self.wake()
        await trio.lowlevel.checkpoint()

    async def drain(self) -> None:
        """Wait for the received batch still committing, if any (before the connection's
        end is taken as the end of what it delivered). Raises what its commit raised."""
        await self._pipeline.drain()
        self._raise_failure()

    def _batch_done(self, batch: Batch, count: int) -> None:
        """A received batch is committed (receivepipe.py calls this in arrival order)."""
        self.entries_received += count
        if count:
            self._service.committed(self)
        if self._session.state is State.ERROR:
            return  # a later batch was refused: the connection ends, no more credit
        cutoff = self._service.cutoff_of(batch.author)
        if cutoff is not None and batch.head.seq > cutoff.seq:
            # What counted is committed; the rest is past the author's removal: stop
            # expecting what the peer claims of it (it drops them once it learns of it).
            self._session.batch_refused(batch.author, batch.size, trio.current_time())
        else:
            self._session.batch_committed(batch.author, batch.head.seq, batch.size,
                                          trio.current_time())
        if self._session.has_output:
            self.wake()  # run() sends the credit

    def _commit_failed(self, error: BaseException) -> None:
        if isinstance(error, EntryRejected):  # (verified again, against a tip that moved)
            quiet.warning(("log", error.reason), "%s sent bad log entries: %s", self.name, error)
        self._failure = error
        self.wake()  # run() raises it, should no message come to handle()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            if isinstance(self._failure, EntryRejected):
                self._session.fail()
            raise self._failure

    async def _send_what_the_peer_lacks(self) -> None:
        session = self._session
        while (request := session.next_send(self._vector(), trio.current_time())) is not None:
            author, after = request
            message = self._service.batch_since(author, after, session.batch_bytes)
            if message is None:  # pragma: no cover - the vector said we have more
                return
            size = batch_size(message["headers"], message["bodies"])
            session.batch_sent(author, message["head"]["seq"], size)
            if log.isEnabledFor(logging.DEBUG):  # (a fingerprint is a hash: not per batch)
                log.debug("%s: sending %d entries of %s", self.name, len(message["headers"]),
                          fingerprint(author))
            await self._send(message)
            await self._flush()

    async def _flush(self) -> None:
        for message in self._session.messages_to_send():
            await self._send(message)

    def _vector(self) -> dict[bytes, int]:
        """Our version vector, allowed authors only: rebuilt once per change of the service's
        vector_version, not per call (callers never modify it)."""
        version = self._service.vector_version
        if self._filtered is None or self._filtered[0] != version:
            self._filtered = (version, {a: s for a, s in self._service.version_vector().items()
                                        if self._allowed(a)})
        return self._filtered[1]



class LogConnection(Protocol):
    async def send(self, message: dict[str, Any]) -> None: ...
    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...


async def sync_over(
    connection: LogConnection,
    service: SyncHost,
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
            await peer.drain()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _, stopping = group.split(Exception)
        if stopping is not None:  # cancelled: that alone propagates, not an error beside it
            raise stopping from None
        raise first_leaf(group) from None
