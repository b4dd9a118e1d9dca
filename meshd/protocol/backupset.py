"""Incremental backups: sealed log segments at the relay, and the signed manifest listing them.

A circle's backup at a relay is a set of immutable **segments** (each one author's entries
from seq `first` to `last`, sealed under the epoch's backup key) plus one **manifest**: the
versioned, signed backup blob of envelope.py (compare-and-swap at the relay, RollbackGuard on
the device) whose snapshot holds the circle records and a reference to every segment with its
BLAKE2b-256 digest. The manifest's signature covers the digests, so a relay can neither alter,
swap nor roll back a segment without the manifest check failing; the segment's AEAD binds it
to the circle, its id and its epoch.

Full segments are listed by **index** blobs (INDEX_REFS references each, sealed like a
segment, pinned by digest in the manifest), so the manifest stored at every upload grows by
one reference per INDEX_REFS full segments. What to build next is backupplan.py's; the shell
(meshd/backup.py) streams entries from its store, seals and uploads them, folds them in with
Manifest.replaced(), and stores the manifest. protocol/relay.md ("Incremental backup").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .crypto import KEY_LEN, RandomSource, blake2b_256
from .envelope import EnvelopeRejected, _epoch_of, _open, _pack, _seal, _unpack_map
from .errors import LocalProtocolError
from .relay import MAX_SEGMENT_BYTES, SEGMENT_ID_BYTES
from .schema import Anything, Array, Bin, Int, Map, MapOf, SchemaError, Text, Tuple

if TYPE_CHECKING:
    from .circle import EpochKeys

MANIFEST_FORMAT = 2  # a manifest without indexes (as issue 20 first made it)
INDEXED_FORMAT = 3  # one with indexes: older readers would miss the indexed segments
CHAINED_FORMAT = 4  # a base blob and deltas (backupchain.py): older readers would find no segments
SEGMENT_AD = b"meshd/backup-segment/1\x00"
INDEX_AD = b"meshd/backup-index/1\x00"
# Full segments are listed by sealed index blobs of INDEX_REFS references each, so the manifest
# stored at every upload holds one reference per INDEX_REFS MiB of log, not one per MiB.
INDEX_REFS = 64
MAX_INDEXES = 10_000
DIGEST_BYTES = 32
# A segment being built is closed once its entries reach this many bytes (a log.entries batch
# is at most BATCH_BYTES beyond it, and a sealed segment at most MAX_SEGMENT_BYTES).
SEGMENT_TARGET_BYTES = 1024 * 1024
BATCH_BYTES = 256 * 1024
# Size levels of a sealed segment: below 16 KiB, below 7/8 of the target, full. A merge is
# made once its parts reach the target, and the merged segment is smaller than the sum of its
# parts (one seal, fewer signed heads), so "full" starts below the target: a merge always
# yields a full segment, never one that must be merged (rewritten) again. An entry is uploaded
# twice (new, merged into a full one): backupplan.py.
LEVEL_BOUNDS = (16 * 1024, SEGMENT_TARGET_BYTES * 7 // 8)
FULL_LEVEL = len(LEVEL_BOUNDS)
MAX_SEGMENTS = 100_000  # per manifest (about 100 bytes each: a 10 MiB manifest)
# A stored manifest's chain (backupchain.py) is at most this many deltas: a reader fetches them in turn.
CHAIN_MAX = 1024
CHAIN_BASES = 2  # a new base once the chain's deltas would pass this many times its size


class ManifestRejected(EnvelopeRejected):
    """A manifest or segment that is not what the signed manifest says (reason as EnvelopeRejected)."""


# Declared shapes of the decoded manifest and segment content (meshd/protocol/schema.py, as
# every decoder of untrusted bytes since issue 12); ranges between fields are checked after.
_COUNT = Int(0, 2**63 - 1)
_BATCH = MapOf(Text(1, 64), Anything(), 64)  # a log.entries batch: ingest checks its own schema
SEGMENT_REF_SCHEMA = Tuple(Bin(exact=SEGMENT_ID_BYTES), Bin(exact=DIGEST_BYTES), Bin(exact=KEY_LEN),
                           _COUNT, _COUNT, _COUNT, _COUNT, _COUNT)
INDEX_REF_SCHEMA = Tuple(Bin(exact=SEGMENT_ID_BYTES), Bin(exact=DIGEST_BYTES), _COUNT, _COUNT, _COUNT)
MANIFEST_SCHEMA = Map({}, {"format": _COUNT, "records": Array(Bin()), "logs": Array(_BATCH),
                           "segments": Array(SEGMENT_REF_SCHEMA, 0, MAX_SEGMENTS),
                           "indexes": Array(INDEX_REF_SCHEMA, 0, MAX_INDEXES)}, open_=True)
BLOB_REF_SCHEMA = Tuple(Bin(exact=SEGMENT_ID_BYTES), Bin(exact=DIGEST_BYTES), _COUNT, _COUNT)
INDEX_CONTENT_SCHEMA = Map({"segments": Array(SEGMENT_REF_SCHEMA, 1, INDEX_REFS)})
SEGMENT_CONTENT_SCHEMA = Map({"author": Bin(exact=KEY_LEN), "first": _COUNT, "last": _COUNT,
                              "logs": Array(_BATCH)})


def _check(schema: Any, value: object, what: str) -> None:
    try:
        schema.check(value)
    except SchemaError as err:
        raise ManifestRejected("malformed", f"{what}: {err}") from err


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """One stored segment as the manifest lists it."""

    id: bytes
    digest: bytes  # BLAKE2b-256 of the sealed blob
    author: bytes
    first: int  # seq of its first entry
    last: int  # seq of its last entry (a signed head)
    size: int  # bytes of the sealed blob
    epoch: int
    bodies: int  # entries in it that carry a body (a purge since lowers the store's count)

    def pack(self) -> list[Any]:
        return [self.id, self.digest, self.author, self.first, self.last, self.size, self.epoch, self.bodies]

    @classmethod
    def unpack(cls, item: Any) -> SegmentRef:
        _check(SEGMENT_REF_SCHEMA, item, "a segment reference")
        sid, digest, author, first, last, size, epoch, bodies = item
        if not 1 <= first <= last or not 0 < size <= MAX_SEGMENT_BYTES or bodies > last - first + 1:
            raise ManifestRejected("malformed", "a segment reference has a bad range, size or body count")
        return cls(sid, digest, author, first, last, size, epoch, bodies)

    @property
    def level(self) -> int:
        for i, bound in enumerate(LEVEL_BOUNDS):
            if self.size < bound:
                return i
        return FULL_LEVEL


@dataclass(frozen=True, slots=True)
class IndexRef:
    """One stored index blob as the manifest lists it: it lists `count` full segments."""

    id: bytes
    digest: bytes  # BLAKE2b-256 of the sealed blob
    size: int
    epoch: int
    count: int

    def pack(self) -> list[Any]:
        return [self.id, self.digest, self.size, self.epoch, self.count]

    @classmethod
    def unpack(cls, item: Any) -> IndexRef:
        _check(INDEX_REF_SCHEMA, item, "an index reference")
        iid, digest, size, epoch, count = item
        if not 0 < size <= MAX_SEGMENT_BYTES or not 1 <= count <= INDEX_REFS:
            raise ManifestRejected("malformed", "an index reference has a bad size or count")
        return cls(iid, digest, size, epoch, count)


@dataclass(frozen=True, slots=True)
class BlobRef:
    """A base or delta blob as the blob after it (or the signed blob) pins it."""

    id: bytes
    digest: bytes  # BLAKE2b-256 of the sealed blob
    size: int
    epoch: int

    def pack(self) -> list[Any]:
        return [self.id, self.digest, self.size, self.epoch]

    @classmethod
    def unpack(cls, item: Any) -> BlobRef:
        _check(BLOB_REF_SCHEMA, item, "a chain reference")
        bid, digest, size, epoch = item
        if not 0 < size <= MAX_SEGMENT_BYTES:
            raise ManifestRejected("malformed", "a chain reference has a bad size")
        return cls(bid, digest, size, epoch)


@dataclass(frozen=True, slots=True)
class Chain:
    """How a stored version is held: its base and its deltas, oldest first."""

    base: BlobRef
    deltas: tuple[BlobRef, ...] = ()

    def ids(self) -> set[bytes]:
        return {self.base.id} | {d.id for d in self.deltas}

    def delta_bytes(self) -> int:
        return sum(d.size for d in self.deltas)

    def signed(self) -> dict[str, Any]:
        """The snapshot sealed in the signed backup blob for this chain."""
        head = self.deltas[-1] if self.deltas else self.base
        # "segments": nil makes a reader of formats 1-3 (which checks it is an array) reject
        # the snapshot as malformed, rather than read an empty manifest and start over.
        return {"format": CHAINED_FORMAT, "head": head.pack(), "depth": len(self.deltas), "segments": None}

    def can_extend(self, delta_size: int) -> bool:
        """Whether one more delta of this size may go on this chain (else: a new base): until
        the deltas reach CHAIN_BASES times the base's size, so the bytes spent on bases are at
        most 1/CHAIN_BASES of those spent on deltas."""
        return (len(self.deltas) < CHAIN_MAX
                and self.delta_bytes() + delta_size <= CHAIN_BASES * self.base.size)


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a backup version holds: the circle records and the segments of the logs.

    `segments` is every segment known: those the snapshot lists, and those of each index
    once read (resolved()); `members` holds, per index, the ids it lists (None: not read
    yet). Planning and snapshot() need every index read."""

    records: tuple[bytes, ...] = ()
    segments: tuple[SegmentRef, ...] = ()
    # A format-1 backup carried the log batches inline: restored, never re-uploaded.
    inline_logs: tuple[dict[str, Any], ...] = ()
    indexes: tuple[IndexRef, ...] = ()
    members: tuple[frozenset[bytes] | None, ...] = ()
    # How the version this manifest was read or derived from is stored, when format 4.
    chain: Chain | None = None

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> Manifest:
        """The manifest in an opened backup's snapshot (format 1, 2 or 3), its indexes not
        read yet; ManifestRejected."""
        _check(MANIFEST_SCHEMA, snapshot, "backup manifest")
        records = snapshot.get("records", [])
        logs = snapshot.get("logs", [])
        segments = tuple(SegmentRef.unpack(item) for item in snapshot.get("segments", []))
        indexes = tuple(IndexRef.unpack(item) for item in snapshot.get("indexes", []))
        ids = [s.id for s in segments] + [i.id for i in indexes]
        if len(set(ids)) != len(ids):
            raise ManifestRejected("malformed", "a segment or index id is listed twice")
        return cls(tuple(records), segments, tuple(logs), indexes, (None,) * len(indexes))

    def unread(self) -> list[IndexRef]:
        return [index for index, ids in zip(self.indexes, self.members, strict=True) if ids is None]

    def resolved(self, index: IndexRef, refs: list[SegmentRef]) -> Manifest:
        """This manifest with the segments index lists (open_index's answer for it)."""
        at = self.indexes.index(index)
        known = self.blob_ids()
        if len(refs) != index.count or len({r.id for r in refs}) != len(refs) or known & {r.id for r in refs}:
            raise ManifestRejected("malformed", "an index lists a segment twice or not as counted")
        members = list(self.members)
        members[at] = frozenset(r.id for r in refs)
        return replace(self, segments=self.segments + tuple(refs), members=tuple(members))

    def snapshot(self) -> dict[str, Any]:
        """The map sealed as the backup's snapshot (protocol/relay.md): the records, the index
        references and the segments no index lists."""
        if self.unread():
            raise LocalProtocolError("a manifest with indexes not read cannot be stored")
        indexed = self._indexed()
        out: dict[str, Any] = {"format": INDEXED_FORMAT if self.indexes else MANIFEST_FORMAT,
                               "records": list(self.records), "logs": [],
                               "segments": [s.pack() for s in self.segments if s.id not in indexed]}
        if self.indexes:
            out["indexes"] = [i.pack() for i in self.indexes]
        return out

    def _indexed(self) -> frozenset[bytes]:
        return frozenset().union(*(ids for ids in self.members if ids is not None))

    def blob_ids(self) -> set[bytes]:
        """The ids of every blob this manifest keeps at the relay: segments, indexes and the
        blobs of its chain."""
        return ({s.id for s in self.segments} | {i.id for i in self.indexes}
                | (self.chain.ids() if self.chain is not None else set()))

    def to_index(self) -> list[SegmentRef] | None:
        """INDEX_REFS full segments no index lists yet (oldest first), once there are as many."""
        indexed = self._indexed()
        loose = sorted((s for s in self.segments if s.level == FULL_LEVEL and s.id not in indexed),
                       key=lambda s: (s.author, s.first))
        return loose[:INDEX_REFS] if len(loose) >= INDEX_REFS else None

    def with_index(self, index: IndexRef, refs: list[SegmentRef]) -> Manifest:
        return replace(self, indexes=self.indexes + (index,), members=self.members + (frozenset(r.id for r in refs),))

    def with_segments(self, segments: tuple[SegmentRef, ...], records: tuple[bytes, ...]) -> Manifest:
        """These segments and records, keeping the indexes that list only segments still here
        (the rest of a dropped index's segments are listed in the snapshot again)."""
        ids = {s.id for s in segments}
        kept = [(i, m) for i, m in zip(self.indexes, self.members, strict=True) if m is not None and m <= ids]
        return replace(self, records=records, segments=segments, inline_logs=(),
                       indexes=tuple(i for i, _ in kept), members=tuple(m for _, m in kept))

    def of(self, author: bytes) -> list[SegmentRef]:
        return sorted((s for s in self.segments if s.author == author), key=lambda s: (s.first, s.last))

    def by_author(self) -> dict[bytes, list[SegmentRef]]:
        """Every author's segments as of() lists them, sorted in one pass."""
        out: dict[bytes, list[SegmentRef]] = {}
        for segment in sorted(self.segments, key=lambda s: (s.first, s.last)):
            out.setdefault(segment.author, []).append(segment)
        return out

    def covered(self, author: bytes) -> int:
        """The highest seq such that segments hold every entry of author from 1 to it."""
        through = 0
        for segment in self.of(author):
            if segment.first > through + 1:
                break
            through = max(through, segment.last)
        return through

    def replaced(self, records: list[bytes], added: list[SegmentRef], removed: set[bytes]) -> Manifest:
        """This manifest with new records, the added segments, without the removed ids and
        without any segment an added one of the same author covers entirely (an index that
        listed one of those is dropped)."""
        if self.unread():
            raise LocalProtocolError("a manifest with indexes not read cannot be changed")

        def obsolete(old: SegmentRef) -> bool:
            return old.id in removed or any(
                new.author == old.author and new.first <= old.first and old.last <= new.last
                for new in added)
        kept = [s for s in self.segments if not obsolete(s)]
        return self.with_segments(tuple(kept + added), tuple(records))


# ---- Segments ----------------------------------------------------------------------------


def _segment_ad(circle_id: bytes, segment_id: bytes, epoch: int) -> bytes:
    return SEGMENT_AD + circle_id + segment_id + epoch.to_bytes(4, "big")


def seal_segment(
    *,
    keys: EpochKeys,
    circle_id: bytes,
    segment_id: bytes,
    author: bytes,
    batches: list[dict[str, Any]],
    rng: RandomSource,
) -> tuple[bytes, SegmentRef]:
    """Seal consecutive log.entries batches of one author; the blob and its manifest entry."""
    if len(segment_id) != SEGMENT_ID_BYTES or not batches:
        raise LocalProtocolError("a segment needs a 16-byte id and at least one batch")
    first = _first_seq(batches[0])
    last = batches[-1]["head"]["seq"]
    body = _pack({"author": author, "first": first, "last": last, "logs": batches})
    blob = _seal(keys.backup, keys.number, _segment_ad(circle_id, segment_id, keys.number), body, rng)
    if len(blob) > MAX_SEGMENT_BYTES:
        raise LocalProtocolError(f"a segment of {len(blob)} bytes exceeds {MAX_SEGMENT_BYTES}")
    bodies = sum(1 for batch in batches for body in batch["bodies"] if body is not None)
    return blob, SegmentRef(segment_id, blake2b_256(blob), author, first, last, len(blob), keys.number, bodies)


def open_segment(
    blob: bytes, *, circle_id: bytes, ref: SegmentRef, keys_for_epoch: Callable[[int], EpochKeys | None],
) -> list[dict[str, Any]]:
    """The batches of a segment fetched for ref; ManifestRejected unless it is exactly that."""
    content = _open_listed(blob, ref, keys_for_epoch, lambda epoch: _segment_ad(circle_id, ref.id, epoch),
                           "segment")
    _check(SEGMENT_CONTENT_SCHEMA, content, "segment content")
    logs: list[dict[str, Any]] = content["logs"]
    if (content["author"] != ref.author or content["first"] != ref.first
            or content["last"] != ref.last):
        raise ManifestRejected("malformed", "the segment's content does not match its reference")
    return logs


def _first_seq(batch: dict[str, Any]) -> int:
    head = batch["head"]["seq"]
    return int(head) - len(batch["headers"]) + 1


def seal_index(
    *, keys: EpochKeys, circle_id: bytes, index_id: bytes, refs: list[SegmentRef], rng: RandomSource,
) -> tuple[bytes, IndexRef]:
    """Seal the references of full segments into an index blob; the blob and its reference."""
    if len(index_id) != SEGMENT_ID_BYTES or not 1 <= len(refs) <= INDEX_REFS:
        raise LocalProtocolError(f"an index needs a 16-byte id and 1 to {INDEX_REFS} references")
    body = _pack({"segments": [r.pack() for r in refs]})
    blob = _seal(keys.backup, keys.number, _index_ad(circle_id, index_id, keys.number), body, rng)
    return blob, IndexRef(index_id, blake2b_256(blob), len(blob), keys.number, len(refs))


def open_index(
    blob: bytes, *, circle_id: bytes, ref: IndexRef, keys_for_epoch: Callable[[int], EpochKeys | None],
) -> list[SegmentRef]:
    """The segment references of an index fetched for ref; ManifestRejected unless it is exactly that."""
    content = _open_listed(blob, ref, keys_for_epoch, lambda epoch: _index_ad(circle_id, ref.id, epoch),
                           "index")
    _check(INDEX_CONTENT_SCHEMA, content, "index content")
    refs = [SegmentRef.unpack(item) for item in content["segments"]]
    if len(refs) != ref.count:
        raise ManifestRejected("malformed", "the index does not hold the count its reference says")
    return refs


def _index_ad(circle_id: bytes, index_id: bytes, epoch: int) -> bytes:
    return INDEX_AD + circle_id + index_id + epoch.to_bytes(4, "big")


def _open_listed(
    blob: bytes, ref: SegmentRef | IndexRef | BlobRef, keys_for_epoch: Callable[[int], EpochKeys | None],
    associated_data: Callable[[int], bytes], what: str,
) -> dict[str, Any]:
    """The opened map of a blob the manifest lists as ref (a segment or an index), checked
    to be exactly that blob before anything is decrypted."""
    if len(blob) != ref.size or blake2b_256(blob) != ref.digest:
        raise ManifestRejected("bad-digest", f"the {what} is not the one the manifest lists")
    epoch = _epoch_of(blob)
    keys = keys_for_epoch(epoch)
    if keys is None or epoch != ref.epoch:
        raise ManifestRejected("unknown-epoch", f"no key for epoch {epoch}")
    return _unpack_map(_open(keys.backup, blob, associated_data(epoch)))
