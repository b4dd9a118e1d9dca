"""The relay's storage interface: what a storage engine must provide, and its contract.

The relay server needs only the methods of RelayStorage, so another engine (a database
shared by several relay instances) can replace the SQLite one (storage.py) without touching the
protocol code. Contract for every implementation:

- A write method returns only once its effect is durable (it survives a crash or kill -9 of
  the process; SQLite: WAL, synchronous=FULL, one transaction per call).
- Write methods may be called from a worker thread, one at a time; read methods are called
  from the event loop's thread, possibly while a write is in progress.
- Envelope ids increase and are never reused within a mailbox, even after deletion, because
  devices use them as cursors; and within a mailbox they become visible in id order (a
  reader that saw id n sees every committed id below n), or a cursor would skip one.
- The storage has an incarnation: a random id created with it (with its database) and never
  changed after. A wiped or replaced storage has a new one, so devices know their cursors
  (envelope ids) and backup versions for this relay no longer mean anything. An engine
  keeps it next to its data (SQLite: the `meta` table), created in the same step.
- Purge (protocol/relay.md "Purge"): bytes of envelopes deleted (ack, expiry) and of
  superseded backups leave every file of the storage within PURGE_BOUND_S. Deletions
  overwrite freed space (SQLite: secure_delete) and `purge()`, called by the server at most
  PURGE_DEBOUNCE_S after a deletion, drops the old page images (SQLite: a TRUNCATE
  checkpoint of the WAL).

A storage shared by several relay processes (`shared = True`, e.g. PostgreSQL) also runs
its reads in worker threads (`blocking_reads`) and reports what the other processes changed
as StorageEvents (relay/postgres.py).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

INCARNATION_BYTES = 16
# A deletion's bytes leave the storage's files within PURGE_BOUND_S (protocol/relay.md).
PURGE_DEBOUNCE_S = 1.0
PURGE_BOUND_S = 5.0


@dataclass(frozen=True, slots=True)
class NewEnvelope:
    circle_id: bytes
    mailbox: bytes
    envelope: bytes
    expires_at: float  # wall-clock seconds


@dataclass(frozen=True, slots=True)
class StoredBackup:
    version: int
    blob: bytes


class StorageUnavailable(Exception):
    """The storage cannot be reached now (a database server down or restarting): the
    request failed and may be retried later. Not a bug of the request."""


@dataclass(frozen=True, slots=True)
class StorageEvent:
    """A change another relay process committed to a shared storage.

    kind: "deposit" (mailbox got envelopes), "usage" (the circle's stored bytes changed by
    delta: acks, expiry, backups), "records" (the circle's record set changed), "rate"
    (circle_id is a device key that made delta requests there), "resync" (events may have
    been missed: re-read everything)."""

    kind: str
    circle_id: bytes = b""
    mailbox: bytes = b""
    delta: int = 0


class RelayStorage(abc.ABC):
    @abc.abstractmethod
    def incarnation(self) -> bytes:
        """This storage's random id (INCARNATION_BYTES), created with it, never changed."""

    @abc.abstractmethod
    def purge(self) -> bool:
        """Make deleted bytes leave every file of the storage (write; see the contract).
        False if it could not finish now (e.g. a long read in progress): call it again."""

    # Several relay processes may use this storage at once (then the server follows events).
    shared: bool = False
    # Reads block on a network round trip: the server runs them in worker threads.
    blocking_reads: bool = False

    # -- circles --
    @abc.abstractmethod
    def circle_records(self, circle_id: bytes) -> list[bytes] | None:
        """The newest record set stored for the circle, or None."""

    @abc.abstractmethod
    def save_circle_records(self, circle_id: bytes, records: Sequence[bytes]) -> None:
        """Replace the circle's record set (write)."""

    def update_circle_records(
        self, circle_id: bytes, update: Callable[[list[bytes] | None], list[bytes] | None]
    ) -> list[bytes] | None:
        """Read-modify-write of the circle's record set, atomic against other writers
        (write): update(stored) returns the new set, or None to leave it. Returns the set
        stored afterwards. This default suits a storage with one writer."""
        stored = self.circle_records(circle_id)
        new = update(stored)
        if new is None:
            return stored
        self.save_circle_records(circle_id, new)
        return new

    @abc.abstractmethod
    def all_circle_records(self) -> list[tuple[bytes, list[bytes]]]:
        """Every circle's record set (read at start-up)."""

    # -- mailboxes --
    @abc.abstractmethod
    def add_envelopes(self, items: Sequence[NewEnvelope]) -> list[int]:
        """Store all items in one transaction (write); their ids, in order."""

    @abc.abstractmethod
    def envelopes_after(
        self, circle_id: bytes, mailbox: bytes, after: int, *, now: float, limit: int,
        max_bytes: int,
    ) -> tuple[list[tuple[int, bytes]], bool]:
        """Unexpired envelopes with id > after, in id order, and whether more remain.

        Returns at least one envelope when any is available, even past max_bytes.
        """

    @abc.abstractmethod
    def delete_through(self, circle_id: bytes, mailbox: bytes, upto: int) -> int:
        """Delete the mailbox's envelopes with id <= upto (write). Returns the bytes freed."""

    @abc.abstractmethod
    def delete_expired(self, now: float) -> dict[bytes, int]:
        """Delete every envelope past its expiry (write). Returns bytes freed per circle."""

    @abc.abstractmethod
    def usage(self) -> dict[bytes, int]:
        """Bytes stored per circle: envelopes plus backup."""

    # -- backups --
    @abc.abstractmethod
    def backup(self, circle_id: bytes) -> StoredBackup | None:
        """The circle's current backup, or None."""

    @abc.abstractmethod
    def put_backup(
        self, circle_id: bytes, expected_version: int, version: int, blob: bytes
    ) -> StoredBackup | None:
        """Compare-and-swap (write): store (version, blob) if the stored version is
        expected_version (0 = none yet). Returns None on success, else the current backup."""

    def share_rates(self, taken: dict[bytes, int]) -> None:
        """Tell the other processes how many requests each device key made here since the
        last call (their rate limits count them). Nothing to do for an unshared storage."""
        return None

    # -- rendezvous offers, for a storage shared by several processes --
    # An offer lives in the process holding the offering connection; the storage tells the
    # other processes where (that process's address), so a join there is passed on to it.

    def claim_nameplate(self, nameplate: int, address: str, now: float, expires_at: float) -> bool:
        """Record that the process at address holds an offer on nameplate (write); False
        when another unexpired offer holds it."""
        return True

    def release_nameplate(self, nameplate: int, address: str) -> None:
        """Forget the offer on nameplate if the process at address holds it (write)."""
        return None

    def nameplate_offered_at(self, nameplate: int, now: float) -> str | None:
        """The address of the process holding an unexpired offer on nameplate, or None."""
        return None

    # -- backup segments (immutable blobs named by the device; protocol/relay.md) --
    @abc.abstractmethod
    def put_segment(self, circle_id: bytes, segment_id: bytes, blob: bytes, device: bytes | None = None) -> bool:
        """Store a segment (write), recording the key of the device that stored it; False
        (nothing stored) if the id already exists.

        segments.device: the key; b"" for the segments stored before the storage recorded
        keys (the migration marks them); NULL for a segment stored since with no key (by a
        process of the same relay still running the version before, during an upgrade)."""

    @abc.abstractmethod
    def segment(self, circle_id: bytes, segment_id: bytes) -> bytes | None:
        """A stored segment, or None."""

    @abc.abstractmethod
    def segments_of(self, circle_id: bytes, device: bytes, after: bytes, limit: int) -> list[tuple[bytes, int]]:
        """(id, size) of the circle's segments `device` stored, and of those stored before
        owners were recorded (b""), in id order after `after`, at most `limit`. Never one
        stored with no key since (NULL): it may be another member's upload in flight, which
        the listing device would delete (its manifest does not list it yet)."""

    @abc.abstractmethod
    def delete_segments(self, circle_id: bytes, segment_ids: Sequence[bytes]) -> int:
        """Delete these segments of the circle (write); the bytes freed."""

    @abc.abstractmethod
    def close(self) -> None: ...
