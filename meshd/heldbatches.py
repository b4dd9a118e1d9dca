"""Log batches that came through a relay before an earlier one, kept in the store until the
hole before them fills.

A batch from a relay may arrive before the batch it follows (that envelope was dropped by
one relay, or is still on another, or a sender resends after a `relay.vector`). Such a batch
cannot be applied yet, and its envelope may be acknowledged (so the relay deletes it) only
once the batch is durable here: it is written to the store before hold() returns. After
every batch an author's log grows by, release() hands back that author's held batches that
now follow on, in order; the caller ingests and forgets them (apply_following does both).

Bounded: at most MAX_HELD_BATCHES (each at most one envelope, <= 1 MiB). Past that the
batch furthest ahead of its author's log is dropped (a warning); the relay.vector owed to
its sender makes it deposit again from the hole, which covers what was dropped.

Store layout (state keys, each write one durable commit): `relay.held` is the index,
msgpack [[author, first_seq, last_seq, slot], ...]; `relay.held.<slot>` holds the batch.
A batch is written before the index names it, and a slot is reused only once the index no
longer names it, so a crash between the two leaves an unnamed slot, never a lost batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from .identity import fingerprint
from .protocol.log import EntryRejected
from .quietlog import QuietLogger
from .store.db import Store

if TYPE_CHECKING:
    from .net.logsync import LogService

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

MAX_HELD_BATCHES = 256
INDEX_KEY = "relay.held"


@dataclass(frozen=True, slots=True)
class _Held:
    author: bytes
    first_seq: int
    last_seq: int
    slot: int


class HeldBatches:
    def __init__(self, store: Store, *, limit: int = MAX_HELD_BATCHES) -> None:
        self._store = store
        self._limit = limit
        raw = store.get_state(INDEX_KEY)
        self._index = [_Held(bytes(a), f, last, s) for a, f, last, s in msgpack.unpackb(raw)] if raw else []
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._index)

    def authors(self) -> set[bytes]:
        return {h.author for h in self._index}

    def hold(self, batch: dict[str, Any]) -> None:
        """Keep a type-checked 'log.entries' batch durably (raises StoreError)."""
        author = bytes(batch["author"])
        last = int(batch["head"]["seq"])
        first = last - len(batch["headers"]) + 1
        if any(h.author == author and h.first_seq == first and h.last_seq == last for h in self._index):
            return  # the same batch again (a copy from a second relay)
        index = list(self._index)
        if len(index) >= self._limit:
            victim = max(index, key=lambda h: h.first_seq)
            if victim.first_seq <= first:
                self._drop_warning()
                return  # this one is furthest ahead: the resend brings it
            index.remove(victim)
            self._drop_warning()
        used = {h.slot for h in index}
        slot = next(s for s in range(len(index) + 1) if s not in used)
        self._store.set_state(f"{INDEX_KEY}.{slot}", msgpack.packb(batch, use_bin_type=True))
        index.append(_Held(author, first, last, slot))
        self._save(index)

    def release(self, author: bytes, tip: int) -> list[tuple[int, dict[str, Any]]]:
        """The author's held batches that start at or before tip + 1, in order, as (slot,
        batch); batches wholly at or below tip are forgotten (their entries arrived)."""
        stale = [h for h in self._index if h.author == author and h.last_seq <= tip]
        if stale:
            self._save([h for h in self._index if h not in stale])
        ready = sorted((h for h in self._index if h.author == author and h.first_seq <= tip + 1),
                       key=lambda h: h.first_seq)
        out = []
        for held in ready:
            raw = self._store.get_state(f"{INDEX_KEY}.{held.slot}")
            if raw:
                out.append((held.slot, msgpack.unpackb(raw, raw=False)))
        return out

    async def apply_following(self, author: bytes, logs: LogService,
                              is_author_allowed: Callable[[bytes], bool]) -> None:
        """Ingest and forget author's held batches that now follow on its log, in order
        (StoreError propagates: they stay held)."""
        while True:
            ready = self.release(author, logs.version_vector().get(author, 0))
            if not ready:
                return
            for slot, batch in ready:
                try:
                    await logs.receive_message(batch, is_author_allowed)
                except EntryRejected as err:
                    if err.reason == "gap":
                        return  # an earlier held batch was dropped: the resend brings it
                    log.warning("relay: a held batch from %s was rejected: %s",
                                fingerprint(author), err)
                self.forget(slot)

    def forget(self, slot: int) -> None:
        self._save([h for h in self._index if h.slot != slot])

    def _save(self, index: list[_Held]) -> None:
        self._store.set_state(INDEX_KEY, msgpack.packb(
            [[h.author, h.first_seq, h.last_seq, h.slot] for h in index]))
        self._index = index

    def _drop_warning(self) -> None:
        self.dropped += 1
        quiet.warning(("held-full",), "relay: %d out-of-order batches held; dropping the one "
                      "furthest ahead (its sender deposits again from the hole)", self._limit)
