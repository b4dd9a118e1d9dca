"""The newest committed entries of each author, kept in memory for batch_since (issue 20).

A live push sends a peer the entries that were committed a moment ago: reading them back
from SQLite cost two statements per push per peer (12,262 executes in a 5-minute soak, 1.15 s
of the trio thread's 25.8 s). The store hands every batch it commits here instead, after
COMMIT, and batch_since serves a range from memory when it is held whole, else from SQLite.

What is held must be what a read of the store would give at that moment, byte for byte:
- only committed entries are added (after COMMIT; a rolled back transaction adds nothing);
- a commit that deletes bodies (a delete, an overwrite, a clear, a loser of a received batch)
  or entries (a cut) empties every tail BEFORE its COMMIT: a push that takes its range
  in between sends what the store held before that commit, as a read in that instant would,
  and no push after it can see a body it deleted;
- a tail is one contiguous run of seqs: a batch that does not continue it starts it anew.
Entries above the reader's tip (committed after it looked) are never served.

Memory is bounded: at most MAX_ENTRIES entries and MAX_BYTES of headers and bodies per author,
at most MAX_AUTHORS authors (the ones that committed last), so about 1 MiB at worst.

Threads: batches are added from the thread that commits (the group commit's writer thread,
a received batch's worker thread), read on the trio thread: a lock guards the tails for the
few list operations of each, never across SQLite.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from ..protocol.log import MAX_BATCH_BYTES, VerifiedBatch

# A live push needs the last few commits; trimmed to half these, a tail still holds seconds
# of writes at the soak's rate (40 entries/s of 1 KB): a push lags a commit by milliseconds.
MAX_ENTRIES = 1024
MAX_BYTES = 256 * 1024
MAX_AUTHORS = 4
MAX_HEADS = 4096  # as the SQL read: the heads one batch may consider


class _Tail:
    """One author's newest entries first_seq, first_seq + 1, ... with their signed heads."""

    __slots__ = ("first_seq", "headers", "bodies", "head_seqs", "head_sigs", "size")

    def __init__(self, first_seq: int) -> None:
        self.first_seq = first_seq
        self.headers: list[bytes] = []
        self.bodies: list[bytes | None] = []
        self.head_seqs: list[int] = []
        self.head_sigs: list[bytes] = []
        self.size = 0

    @property
    def next_seq(self) -> int:
        return self.first_seq + len(self.headers)

    def add(self, batch: VerifiedBatch) -> None:
        self.headers += batch.headers
        self.bodies += batch.bodies
        self.size += sum(map(len, batch.headers)) + sum(map(len, filter(None, batch.bodies)))
        for head in batch.heads:
            self.head_seqs.append(head.seq)
            self.head_sigs.append(head.sig)
        if len(self.headers) > MAX_ENTRIES or self.size > MAX_BYTES:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        """Down to half the bounds (so a busy author trims once per many batches, not per batch)."""
        count, size = len(self.headers), self.size
        drop = 0
        while drop < count and (count - drop > MAX_ENTRIES // 2 or size > MAX_BYTES // 2):
            body = self.bodies[drop]
            size -= len(self.headers[drop]) + (len(body) if body else 0)
            drop += 1
        del self.headers[:drop], self.bodies[:drop]
        self.first_seq += drop
        self.size = size
        keep = bisect_left(self.head_seqs, self.first_seq)
        del self.head_seqs[:keep], self.head_sigs[:keep]


class RecentEntries:
    """Bounded per-author tails of committed entries (see the module comment)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tails: dict[bytes, _Tail] = {}  # the author that committed last, last
        self.served = 0  # batches served from memory (tests and metrics)

    def add(self, batches: Iterable[VerifiedBatch]) -> None:
        """After COMMIT: these batches (each continuing its author's log) are committed."""
        with self._lock:
            for batch in batches:
                if not len(batch):
                    continue
                tail = self._tails.pop(batch.author, None)
                if tail is None or tail.next_seq != batch.first_seq:
                    tail = _Tail(batch.first_seq)
                tail.add(batch)
                self._tails[batch.author] = tail
            while len(self._tails) > MAX_AUTHORS:
                del self._tails[next(iter(self._tails))]

    def clear(self) -> None:
        """Before the COMMIT of a transaction that deletes bodies or entries."""
        with self._lock:
            self._tails.clear()

    def batch(self, author: bytes, after_seq: int, tip_seq: int, max_bytes: int
              ) -> tuple[list[bytes], list[bytes | None], int, bytes] | None:
        """StoreReads.batch_since's cut of author's entries after after_seq up to tip_seq:
        (headers, bodies, head seq, head sig), or None unless held whole (the caller reads
        SQLite, which also says what is wrong if no signed head is in the range)."""
        with self._lock:
            tail = self._tails.get(author)
            if tail is None or after_seq < tail.first_seq - 1 or tip_seq >= tail.next_seq:
                return None
            seqs = tail.head_seqs
            low = bisect_right(seqs, after_seq)
            high = min(bisect_right(seqs, tip_seq), low + MAX_HEADS)
            if low == high:
                return None
            start = after_seq + 1 - tail.first_seq
            headers, bodies = tail.headers, tail.bodies
            size = 0
            cut = (0, low)  # entries past start, head index, at the last boundary
            index = start
            for h in range(low, high):
                end = seqs[h] + 1 - tail.first_seq
                size += sum(map(len, headers[index:end])) + sum(
                    map(len, filter(None, bodies[index:end])))
                index = end
                if size > MAX_BATCH_BYTES and cut[0]:
                    break
                cut = (end - start, h)
                if size >= max_bytes:
                    break
            count, h = cut
            self.served += 1
            return (headers[start:start + count], bodies[start:start + count], seqs[h],
                    tail.head_sigs[h])
