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

Failure: the transaction is all or none. An insert that fails (a full disk) stops the
composer after its current part and is raised here once the composer has ended; a composer
that fails (a bug) rolls the transaction back with its error. Nothing of the group is then
committed, and the group commit retries its units alone, as for any failed group.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

from ..protocol.crypto import SigningKeyPair
from ..protocol.log import VerifiedBatch, Write, compose_units, joined, split_units
from ..store.bulk import pack
from ..store.db import Store

PART_ENTRIES = 1024  # writes per part: ~0.4 MB of 200-byte puts, ~2 ms to compose
_DONE = object()


def compose_and_commit(store: Store, signer: SigningKeyPair, tip: tuple[int, bytes],
                       last_hlc: int, wall_ms: int, units: Sequence[Sequence[Write]]
                       ) -> VerifiedBatch:
    """Compose units (checked writes) continuing tip and commit them durably in one
    transaction; a large group in parts composed ahead (module comment). The caller holds
    store.write_lock."""
    if sum(map(len, units)) < 2 * PART_ENTRIES:  # (the usual group: single writes)
        batch = compose_units(signer, *tip, last_hlc, wall_ms, units, checked=True)
        store.commit_batch(batch, durable=True)
        return batch
    parts = split_units(units, PART_ENTRIES)
    composed: queue.SimpleQueue[object] = queue.SimpleQueue()
    stop = threading.Event()
    # The first part is composed here, before the helper starts: handed over, it cost the
    # writer the helper's start and then a wait for the GIL (module comment).
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
