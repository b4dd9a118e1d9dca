"""A large group of local writes composed in parts by a helper thread, one part ahead of
the inserts (issue 16: a batch request's composition overlaps its own SQLite work).

Theory of operation. Composing entries (msgpack, two BLAKE2b hashes per entry: Python that
holds the GIL) and inserting them (SQLite statements, which release it) were two serial
steps of the group commit's writer thread: on two cores, half of each was spent waiting for
the other. compose_and_commit() cuts a group of at least 2 * PART_ENTRIES writes into parts
(compose.split_units): the writer thread composes the first part itself, then a helper
thread composes the others, each from the last one's tip, and hands each over as it is
done, while the writer thread inserts the parts in one transaction (Store.commit_batches),
part n while part n+1 is composed. (Handing the first part over too made the writer wait
for the helper's start and then for the GIL, which the helper held composing the next
part: ~6 ms of a 1 MiB request's ~40, bench/batch_timeline.py.) The entries are
those composing the whole at once gives (same wall_ms, so the same hlcs and record ids),
plus a signed head at the end of each part. The helper thread also packs each part's
columns as the store's statements take them (bulk.pack: joins and JSON, ~1 us per entry of
Python), so that for those parts the writer thread, which needs the GIL between its
statements, does only SQLite work and the binding of ready parameters. The caller holds the store's write_lock
throughout, as for a group composed at once, so the tip the parts continue cannot move.

Across groups (a row of pipelined batch requests, api/httpserver.py: the next one is queued
while this one commits): once the helper has composed this group's last part, it also
composes the first part of the unit queued next (Lookahead.peek, GroupCommit.next_unit), if
that unit is large, from this group's tip and a fresh wall_ms, while the writer thread
inserts the last part and COMMITs (~6 ms of fsync, when nothing else was composed: the
group's first part had to be composed at its start, with the GIL shared with the next
request's reading and decoding). The next group uses that part only if it starts with that
very unit and continues exactly that tip and clock (store.tip and the service's last hlc);
anything else (a failed group, a write outside the group commit) composes it afresh.

Failure: the transaction is all or none. An insert that fails (a full disk) stops the
composer after its current part and is raised here once the composer has ended; a composer
that fails (a bug) rolls the transaction back with its error. Nothing of the group is then
committed, and the group commit retries its units alone, as for any failed group.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..containment import report_bug
from ..protocol.crypto import SigningKeyPair
from ..protocol.log import VerifiedBatch, Write, compose_units, joined, split_units
from ..store.bulk import pack
from ..store.db import Store

PART_ENTRIES = 1024  # writes per part: ~0.4 MB of 200-byte puts, ~2 ms to compose
_DONE = object()


@dataclass(eq=False)
class NextPart:
    """The first part of `unit`, composed continuing `after` (seq, hash, hlc) at wall_ms."""

    unit: Sequence[Write]
    after: tuple[int, bytes, int]
    wall_ms: int
    batch: VerifiedBatch


class Lookahead:
    """What the helper needs to compose the next group's first part (module comment): peek
    gives the unit queued next, if any (any thread); wall_ms the clock; part, what it made."""

    def __init__(self, peek: Callable[[], Sequence[Write] | None], wall_ms: Callable[[], int]) -> None:
        self.peek = peek
        self.wall_ms = wall_ms
        self.part: NextPart | None = None
        self.made = 0  # parts composed ahead, and used (tests, bench)
        self.used = 0


def compose_and_commit(store: Store, signer: SigningKeyPair, tip: tuple[int, bytes],
                       last_hlc: int, wall_ms: int, units: Sequence[Sequence[Write]],
                       lookahead: Lookahead | None = None) -> VerifiedBatch:
    """Compose units (checked writes) continuing tip and commit them durably in one
    transaction; a large group in parts composed ahead, and with a lookahead, the first part
    of the next unit queued (module comment). The caller holds store.write_lock."""
    ahead = None
    if lookahead is not None:
        ahead, lookahead.part = lookahead.part, None
        if ahead is not None and (not units or ahead.unit is not units[0]
                                  or ahead.after != (*tip, last_hlc)):
            ahead = None  # (not this group's start, or the tip moved: composed afresh)
    if sum(map(len, units)) < 2 * PART_ENTRIES:  # (the usual group: single writes)
        batch = compose_units(signer, *tip, last_hlc, wall_ms, units, checked=True)
        store.commit_batch(batch, durable=True)
        return batch
    parts = split_units(units, PART_ENTRIES)
    composed: queue.SimpleQueue[object] = queue.SimpleQueue()
    stop = threading.Event()
    # The first part is composed here, before the helper starts: handed over, it cost the
    # writer the helper's start and then a wait for the GIL (module comment).
    if ahead is not None:  # (its unit is at least 2 parts long: parts[0] is its first part)
        first, wall_ms = ahead.batch, ahead.wall_ms
        lookahead.used += 1  # type: ignore[union-attr]
    else:
        first = compose_units(signer, *tip, last_hlc, wall_ms, parts[0], checked=True)
    composed.put(first)

    def compose_parts() -> None:
        try:
            seq, last_hash, hlc = first.last_seq, first.last_hash, first.max_hlc
            for part in parts[1:]:
                if stop.is_set():
                    break
                batch = compose_units(signer, seq, last_hash, hlc, wall_ms, part, checked=True)
                seq, last_hash, hlc = batch.last_seq, batch.last_hash, batch.max_hlc
                batch.packed = pack(batch)  # (here, not in the writer thread: module comment)
                composed.put(batch)
        except BaseException as err:  # noqa: BLE001 - raised on the writer thread instead
            composed.put(err)
            composed.put(_DONE)
            return
        composed.put(_DONE)
        if lookahead is not None and not stop.is_set():
            try:
                compose_next(seq, last_hash, hlc)
            except Exception as err:  # a bug; the group is unharmed (the next composes afresh)
                report_bug("composeahead", err)

    def compose_next(seq: int, last_hash: bytes, hlc: int) -> None:
        assert lookahead is not None
        unit = lookahead.peek()
        if unit is None or len(unit) < 2 * PART_ENTRIES:
            return
        now = lookahead.wall_ms()
        batch = compose_units(signer, seq, last_hash, hlc, now,
                              split_units([unit], PART_ENTRIES)[0], checked=True)
        batch.packed = pack(batch)
        lookahead.part = NextPart(unit, (seq, last_hash, hlc), now, batch)
        lookahead.made += 1

    done: list[VerifiedBatch] = []

    def batches() -> Iterator[VerifiedBatch]:
        while (item := composed.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, VerifiedBatch)
            done.append(item)
            yield item

    composer = threading.Thread(target=compose_parts, name="meshd compose", daemon=True)
    composer.start()
    try:
        store.commit_batches(batches(), durable=True)
    finally:
        stop.set()
        composer.join()
    return joined(done)
