"""The daemon's handle on message logs (LogService).

LogService owns this device's log: it turns app writes into signed entries and commits
them before returning (synchronous=FULL; concurrent writes share one transaction and run
in a worker thread, see groupcommit.py), answers reads from the materialised view, and
verifies-then-commits batches from peers (off the trio thread: one thread at a time holds
the store's write connection, under its write_lock, and the trio thread keeps serving; a
connection's batch n+1 is verified, verify_received, while batch n commits,
commit_verified: see receivepipe.py). Every
commit wakes the PeerSyncs (peersync.py), so a new entry, local or received, is pushed to
every connected peer that lacks it within one scheduler pass. A removed author's entries
past its removal point are cut off a batch before verification (protocol/cutoff.py) and,
when the removal arrives later, dropped from the store (apply_cutoffs).

Failure contract: receive() and ingest() raise EntryRejected (nothing of that batch
committed) for bad entries; StoreError means our disk failed and propagates as it is.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import trio

from ..identity import fingerprint
from ..protocol.crypto import SigningKeyPair
from ..protocol.cutoff import cut_batch
from ..protocol.log import (
    CLEAR,
    DELETE,
    PUT,
    Batch,
    Head,
    Header,
    InvalidRequest,
    PutRun,
    VerifiedBatch,
    Write,
    adoptable_hlc,
    auto_record_id,
    check_write,
    compose_batch,
    hlc_limit,
    next_hlc,
    verify_batch,
)
from ..protocol.sync import BATCH_BYTES, STALL_TIMEOUT_S, WINDOW_BYTES
from ..store.db import Store, StoreError
from ..store.groupcommit import GroupCommit
from .commitsignal import CommitSignal
from .composeahead import compose_and_commit
from .peersync import PeerSync

log = logging.getLogger(__name__)

MAX_READ_LIMIT = 1000
BULK_CHUNK_ENTRIES = 10_000
PIPELINE_CHUNK_ENTRIES = 1000


class LogService:
    def __init__(self, store: Store, signer: SigningKeyPair, wall_ms: Callable[[], int]) -> None:
        self.store = store
        self._signer = signer
        self.author = bytes(signer.public)
        self._wall_ms = wall_ms
        self.changed = CommitSignal()
        self.peers: set[PeerSync] = set()
        # Changes whenever the version vector, or who may author, may have changed: a PeerSync
        # rebuilds its filtered vector only then (not several times per message). Set right
        # after each commit, on whichever thread made it (before the trio thread hears of
        # it), so a vector read in between is never kept: each value is drawn once from a
        # counter (next() is atomic), so no stale vector's version ever comes back.
        self._versions = itertools.count(1)
        self.vector_version = 0
        # Our clock never runs behind our own chain, nor behind other authors' entries within
        # the drift bound; one past it (stored by an older meshd) must not block local writes.
        self._hlc = 0
        for author in store.version_vector():
            header = store.last_header(author)
            if header is not None:
                stored = Header.decode(header).hlc
                if author == self.author or adoptable_hlc(stored, self._wall_ms()):
                    self._hlc = max(self._hlc, stored)
        # A removed author's removal point (protocol/logs.md, "A removed member's entries"):
        # the daemon answers from the circle; entries past it are never committed.
        self.cutoff_of: Callable[[bytes], Head | None] = lambda _author: None
        self.group_commit: GroupCommit[VerifiedBatch] = GroupCommit(
            lambda writes: self._compose_and_commit([writes]), lambda _batch: self._committed(),
            commit_units=self._compose_and_commit)

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
        """Commit writes (from checked_write, or a PutRun its maker checked) in the next
        group commit, all or none; returns
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
        if type(writes) is not PutRun:  # (a PutRun was checked as a whole by its maker)
            writes = [w if isinstance(w, CheckedWrite) else
                      checked_write(w.op, w.stream, w.record_id or None, w.body) for w in writes]
        return await self.group_commit.submit(writes)

    def _compose_and_commit(self, units: list[Sequence[Write]]) -> VerifiedBatch:
        """Read the tip, compose and commit a group (its units' writes, in order) as one
        step under the store's write lock (runs in the group commit's worker thread); a put
        without a record id gets one here."""
        with self.store.write_lock:
            # Every write is a CheckedWrite or in a PutRun (submit made sure), so they are
            # composed unchecked; a put's record id "" asks for a fresh one. A large group
            # is composed in parts while the parts before are inserted (composeahead.py).
            batch = compose_and_commit(self.store, self._signer, self.store.tip(self.author),
                                       self._hlc, self._wall_ms(), units)
            self.vector_version = next(self._versions)
            self._hlc = max(self._hlc, batch.max_hlc)
        return batch

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
            self.vector_version = next(self._versions)
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
        """Every stream's live records, on a connection of its own (any thread; O(records))."""
        return [{"stream": name, "records": count} for name, count in self.store.streams_apart()]

    def version_vector(self) -> dict[bytes, int]:
        return self.store.version_vector()

    # -- sync --

    def ingest(self, batch: dict[str, Any], is_author_allowed: Callable[[bytes], bool]) -> int:
        """Verify and commit one 'log.entries' message; returns the number of new entries.
        Raises EntryRejected (nothing committed) or StoreError."""
        return self.ingest_batch(Batch.from_message(batch), is_author_allowed)

    def ingest_batch(self, batch: Batch, is_author_allowed: Callable[[bytes], bool]) -> int:
        """ingest() of a decoded batch, committed on the calling thread."""
        count = self._verify_and_commit(batch, is_author_allowed(batch.author),
                                        self.cutoff_of(batch.author))
        if count:
            self._committed()
        return count

    async def receive(self, batch: Batch, is_author_allowed: Callable[[bytes], bool], *,
                      source: PeerSync | None = None) -> int:
        """ingest_batch() with the verification and the commit in a worker thread (one at a
        time; the store's write_lock orders it with the group commit's writer thread), so
        the trio thread keeps serving. A batch that holds nothing past our tip (a copy of
        what reached us another way) is checked here, with no thread and no lock: there is
        nothing to hash or commit. A commit wakes every peer but source (the PeerSync the
        batch came from: it has nothing to send back)."""
        allowed = is_author_allowed(batch.author)  # on the trio thread, where the circle lives
        cutoff = self.cutoff_of(batch.author)
        seq, hash = self.store.tip(batch.author)
        if batch.head.seq <= seq:
            self.verify_received(batch, allowed, cutoff, seq, hash)
            return 0
        count = await trio.to_thread.run_sync(self._verify_and_commit, batch, allowed, cutoff,
                                              limiter=self.group_commit.limiter)
        if count:
            self._committed(source)
        return count

    async def receive_message(self, batch: dict[str, Any],
                              is_author_allowed: Callable[[bytes], bool]) -> int:
        """ingest() through receive(): the verification and the commit in a worker thread."""
        return await self.receive(Batch.from_message(batch), is_author_allowed)

    def verify_received(self, batch: Batch, allowed: bool, cutoff: Head | None, seq: int,
                        hash: bytes) -> VerifiedBatch:
        """The entries of batch past the tip (seq, hash), checked; any thread, no lock (the
        tip may be one a batch still committing leaves: see receivepipe.py). Raises
        EntryRejected."""
        if allowed:  # (an unknown author is refused as such by verify_batch)
            batch = cut_batch(batch, cutoff)  # EntryRejected('past-removal') if none counts
        return verify_batch(batch, seq, hash, lambda _author: allowed,
                            hlc_bound=hlc_limit(self._wall_ms()))

    def _verify_and_commit(self, batch: Batch, allowed: bool, cutoff: Head | None) -> int:
        return self.commit_verified(batch, allowed, cutoff, -1, b"", None)

    def commit_verified(self, batch: Batch, allowed: bool, cutoff: Head | None, seq: int,
                        hash: bytes, verified: VerifiedBatch | None) -> int:
        """Commit verified, batch's entries past the tip (seq, hash), in the calling thread;
        if the author's tip is not (seq, hash) by the time the write lock is ours (another
        connection moved it), batch is verified again against the tip found. Returns the
        number of new entries. Raises EntryRejected (nothing committed), StoreError. The
        author's removal point is read again here: one that arrived since `cutoff` was read
        found nothing of this batch to drop (Store.cut_author), so it applies now."""
        with self.store.write_lock:  # the tip must not move between reading and committing
            tip = self.store.tip(batch.author)
            current = self.cutoff_of(batch.author)
            if verified is None or tip != (seq, hash) or current != cutoff:
                verified = self.verify_received(batch, allowed, current, *tip)
            if not len(verified):
                return 0
            self.store.commit_batch(verified, durable=False)
            self.vector_version = next(self._versions)
            # Under the lock: the group commit's thread reads and advances _hlc under it too.
            if verified.max_hlc > self._hlc and adoptable_hlc(verified.max_hlc, self._wall_ms()):
                self._hlc = verified.max_hlc
        return len(verified)

    def apply_cutoffs(self, cutoffs: Mapping[bytes, Head]) -> list[bytes]:
        """Drop every removed author's entries past its removal point and rebuild the views
        they touched (Store.cut_author); the authors whose entries were dropped. Never our
        own: a removed device keeps its data, and should its removal stop counting (the
        recovery words settle a dispute), its entries flow back from it."""
        cut = self._cut(cutoffs)
        if cut:
            self._committed()
        return cut

    def cutoffs_changed(self, cutoffs: Mapping[bytes, Head], nursery: trio.Nursery | None) -> None:
        """The circle's removal points changed: apply_cutoffs, in the writer thread when a
        nursery runs (a rebuild scans the touched streams' entries: ~1 s for 200,000, see
        bench/cut_rebuild.py), so the trio thread keeps serving. Entries past a cutoff are
        refused on receipt from now on either way (cutoff_of reads the circle)."""
        if nursery is None:
            self.apply_cutoffs(cutoffs)
        else:
            nursery.start_soon(self._apply_cutoffs_in_thread, dict(cutoffs))

    async def _apply_cutoffs_in_thread(self, cutoffs: Mapping[bytes, Head]) -> None:
        cut = await trio.to_thread.run_sync(self._cut, cutoffs, limiter=self.group_commit.limiter)
        if cut:
            self._committed()

    def _cut(self, cutoffs: Mapping[bytes, Head]) -> list[bytes]:
        cut = []
        for author, cutoff in sorted(cutoffs.items()):
            try:
                if author != self.author and self.store.cut_author(author, cutoff):
                    self.vector_version = next(self._versions)
                    cut.append(author)
                    log.warning("entries of removed device %s past its removal point dropped "
                                "(its entries count up to %d)", fingerprint(author), cutoff.seq)
            except StoreError as err:  # the disk: tried again at the next change or start
                log.warning("could not drop a removed device's entries past its removal "
                            "point: %s", err)
        return cut

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

    def circle_changed(self) -> None:
        """Who may author may have changed: the peers' filtered vectors are stale."""
        self.vector_version = next(self._versions)
        for peer in self.peers:
            peer.wake()

    def committed(self, source: PeerSync | None = None) -> None:
        """A commit made outside this class (receivepipe.py): wake all but source."""
        self._committed(source)

    def _committed(self, source: PeerSync | None = None) -> None:
        # (vector_version was set where the commit was made, right after it)
        self.changed.fire()
        for peer in self.peers:
            if peer is not source:
                peer.wake()


@dataclasses.dataclass(frozen=True, slots=True)
class CheckedWrite(Write):
    """A Write whose check() passed: made by checked_write, or by StreamService's batch of puts
    after the same checks done once per batch; record_id "" on a put asks for a fresh id."""


def checked_write(op: int, stream: str, record_id: str | None, body: bytes = b"") -> CheckedWrite:
    """A write for LogService.submit; record_id None (puts only) asks for a fresh id.
    Raises InvalidRequest now, so one bad write never fails a group it would have joined."""
    if record_id is None:
        if op != PUT:
            raise InvalidRequest("a record id is required")
        check_write(stream, "x", op, body)
        return CheckedWrite(stream, "", op, body)
    check_write(stream, record_id, op, body)
    return CheckedWrite(stream, record_id, op, body)
