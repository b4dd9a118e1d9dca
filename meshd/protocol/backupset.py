"""Incremental backups: sealed log segments at the relay, and the signed manifest listing them.

A circle's backup at a relay is a set of immutable **segments** (each one author's entries
from seq `first` to `last`, sealed under the epoch's backup key) plus one **manifest**: the
versioned, signed backup blob of envelope.py (compare-and-swap at the relay, RollbackGuard on
the device) whose snapshot holds the circle records and a reference to every segment with its
BLAKE2b-256 digest. The manifest's signature covers the digests, so a relay can neither alter,
swap nor roll back a segment without the manifest check failing; the segment's AEAD binds it
to the circle, its id and its epoch.

An upload costs what changed: next_build() says which segment to build next (the entries no
segment covers yet, then compaction merges), the shell streams the entries from its store,
seals and uploads them, folds them in with Manifest.replaced(), and stores the manifest.
Compaction is size-tiered: FANIN adjacent segments of one size level merge into one of the
next level, so every entry is re-uploaded about log_FANIN(target / typical upload) times and
the number of segments per author stays bounded (at most FANIN per level below full). protocol/relay.md ("Incremental backup").
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .crypto import KEY_LEN, RandomSource, blake2b_256
from .envelope import EnvelopeRejected, _epoch_of, _open, _pack, _seal, _unpack_map
from .errors import LocalProtocolError
from .relay import MAX_SEGMENT_BYTES, SEGMENT_ID_BYTES
from .schema import Anything, Array, Bin, Int, Map, MapOf, SchemaError, Text, Tuple

if TYPE_CHECKING:
    from .circle import EpochKeys

MANIFEST_FORMAT = 2
SEGMENT_AD = b"meshd/backup-segment/1\x00"
DIGEST_BYTES = 32
# A segment being built is closed once its entries reach this many bytes (a log.entries batch
# is at most BATCH_BYTES beyond it, and a sealed segment at most MAX_SEGMENT_BYTES).
SEGMENT_TARGET_BYTES = 1024 * 1024
BATCH_BYTES = 256 * 1024
FANIN = 32
# Size levels of a sealed segment: below 16 KiB, below 7/8 of the target, full. A merge is
# made once its parts reach the target, and the merged segment is smaller than the sum of its
# parts (one seal, fewer signed heads), so "full" starts below the target: a merge always
# yields a full segment, never one that must be merged (rewritten) again. An entry is uploaded
# at most three times (new, merged into a level-1 segment, merged into a full one), and twice
# when uploads carry at least 16 KiB (they start at level 1).
LEVEL_BOUNDS = (16 * 1024, SEGMENT_TARGET_BYTES * 7 // 8)
FULL_LEVEL = len(LEVEL_BOUNDS)
# Past this many segments below full size per author, the oldest adjacent ones merge anyway
# (sizes that never line up in FANIN same-level runs cannot grow the manifest without bound).
MAX_LOOSE_PER_AUTHOR = FANIN + SEGMENT_TARGET_BYTES // LEVEL_BOUNDS[0]
# A segment of level 1 or full is rebuilt once 1/PURGE_FRACTION of its bodies were purged.
PURGE_FRACTION = 8
MAX_SEGMENTS = 100_000  # per manifest (about 100 bytes each: a 10 MiB manifest)


class ManifestRejected(EnvelopeRejected):
    """A manifest or segment that is not what the signed manifest says (reason as EnvelopeRejected)."""


# Declared shapes of the decoded manifest and segment content (meshd/protocol/schema.py, as
# every decoder of untrusted bytes since issue 12); ranges between fields are checked after.
_COUNT = Int(0, 2**63 - 1)
_BATCH = MapOf(Text(1, 64), Anything(), 64)  # a log.entries batch: ingest checks its own schema
SEGMENT_REF_SCHEMA = Tuple(Bin(exact=SEGMENT_ID_BYTES), Bin(exact=DIGEST_BYTES), Bin(exact=KEY_LEN),
                           _COUNT, _COUNT, _COUNT, _COUNT, _COUNT)
MANIFEST_SCHEMA = Map({}, {"format": _COUNT, "records": Array(Bin()), "logs": Array(_BATCH),
                           "segments": Array(SEGMENT_REF_SCHEMA, 0, MAX_SEGMENTS)}, open_=True)
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
        return next((i for i, bound in enumerate(LEVEL_BOUNDS) if self.size < bound), FULL_LEVEL)


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a backup version holds: the circle records and the segments of the logs."""

    records: tuple[bytes, ...] = ()
    segments: tuple[SegmentRef, ...] = ()
    # A format-1 backup carried the log batches inline: restored, never re-uploaded.
    inline_logs: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> Manifest:
        """The manifest in an opened backup's snapshot (format 1 or 2); ManifestRejected."""
        _check(MANIFEST_SCHEMA, snapshot, "backup manifest")
        records = snapshot.get("records", [])
        logs = snapshot.get("logs", [])
        items = snapshot.get("segments", [])
        segments = tuple(SegmentRef.unpack(item) for item in items)
        if len({s.id for s in segments}) != len(segments):
            raise ManifestRejected("malformed", "a segment id is listed twice")
        return cls(tuple(records), segments, tuple(logs))

    def snapshot(self) -> dict[str, Any]:
        """The map sealed as the backup's snapshot (protocol/relay.md)."""
        return {"format": MANIFEST_FORMAT, "records": list(self.records), "logs": [],
                "segments": [s.pack() for s in self.segments]}

    def of(self, author: bytes) -> list[SegmentRef]:
        return sorted((s for s in self.segments if s.author == author), key=lambda s: (s.first, s.last))

    def covered(self, author: bytes) -> int:
        """The highest seq such that segments hold every entry of author from 1 to it."""
        through = 0
        for segment in self.of(author):
            if segment.first > through + 1:
                break
            through = max(through, segment.last)
        return through

    def stored_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def replaced(self, records: list[bytes], added: list[SegmentRef], removed: set[bytes]) -> Manifest:
        """This manifest with new records, the added segments, without the removed ids and
        without any segment an added one of the same author covers entirely."""
        def obsolete(old: SegmentRef) -> bool:
            return old.id in removed or any(
                new.author == old.author and new.first <= old.first and old.last <= new.last
                for new in added)
        kept = [s for s in self.segments if not obsolete(s)]
        return replace(self, records=tuple(records), segments=tuple(kept + added), inline_logs=())


@dataclass(frozen=True, slots=True)
class Build:
    """Build segments of author's entries from seq after+1 until one ends at or past through,
    replacing the listed segments (a merge or a re-seal) or none (new entries)."""

    author: bytes
    after: int
    through: int
    replaces: tuple[bytes, ...] = ()
    # A merge: build one segment (below 2 x SEGMENT_TARGET_BYTES), not several of the target size,
    # so no small remainder is left to merge again.
    whole: bool = False


def next_build(
    manifest: Manifest, vector: dict[bytes, int], epoch: int, bodies_now: Mapping[bytes, int] | None = None,
    authors: Collection[bytes] | None = None,
) -> Build | None:
    """The next segment(s) to build for the manifest to back up the log in vector, or None.

    In order: re-seal an author's segments of an older epoch (so a removed member's old
    keys open nothing current), cover entries no segment holds, rebuild segments whose
    bodies were purged (bodies_now: segment id -> bodies the store still has for its range,
    for the segments the shell checked), then compaction merges. Only ranges this device
    holds entirely (vector[author] >= their end) are built, and only for `authors` (all if
    None: see responsible_authors()).
    """
    mine = sorted((a, t) for a, t in vector.items() if authors is None or a in authors)
    for author, tip in mine:
        segments = manifest.of(author)
        if segments and tip >= max(s.last for s in segments) and any(s.epoch != epoch for s in segments):
            return Build(author, 0, tip, tuple(s.id for s in segments))
    for author, tip in mine:
        covered = manifest.covered(author)
        if tip > covered:
            return Build(author, covered, tip)
    for segment in manifest.segments:
        now = (bodies_now or {}).get(segment.id)
        if (now is not None and (authors is None or segment.author in authors)
                and segment.last <= vector.get(segment.author, 0) and _purge_due(segment, now)):
            return Build(segment.author, segment.first - 1, segment.last, (segment.id,), whole=True)
    for author, tip in mine:
        run, whole = _merge_run(manifest.of(author))
        if run and run[-1].last <= tip:
            return Build(author, run[0].first - 1, run[-1].last, tuple(s.id for s in run), whole)
    return None


def lagging(manifest: Manifest, vector: dict[bytes, int], epoch: int) -> set[bytes]:
    """Authors whose entries this device holds but the manifest does not (yet): entries no
    segment covers, or segments of an older epoch."""
    return {author for author, tip in vector.items()
            if manifest.covered(author) < tip or any(s.epoch != epoch for s in manifest.of(author))}


def responsible_authors(own: bytes, lag_since: Mapping[bytes, float], now: float, grace_s: float,
                        removed: Collection[bytes] = ()) -> set[bytes]:
    """Whose segments this device builds: its own, and another author's once the manifest
    has lagged behind this device's copy for grace_s (that author's device is away). Each
    device backing up what it wrote keeps devices from uploading the same entries twice.
    A removed author's lagging entries are taken over at once: its device never uploads
    again, and what it wrote before its removal is the circle's to keep (issue 15, F4)."""
    return {own} | {author for author, since in lag_since.items()
                    if author in removed or now - since >= grace_s}


def rebase(base: Manifest, theirs: Manifest, ours: Manifest, authors: Collection[bytes]) -> Manifest | None:
    """After a compare-and-swap conflict: our changes (base -> ours, limited to `authors`)
    applied to the version another device stored (theirs), or None when that device changed
    the same authors' segments (then ours are void and the plan starts again from theirs)."""
    def listed(manifest: Manifest, author: bytes) -> set[bytes]:
        return {s.id for s in manifest.segments if s.author == author}

    changed = {s.author for s in ours.segments if s.id not in {b.id for b in base.segments}} | {
        s.author for s in base.segments if s.id not in {o.id for o in ours.segments}}
    if not changed <= set(authors) or any(listed(base, a) != listed(theirs, a) for a in changed):
        return None
    kept = [s for s in theirs.segments if s.author not in changed]
    return replace(theirs, records=ours.records,
                   segments=tuple(kept + [s for s in ours.segments if s.author in changed]))


def _purge_due(segment: SegmentRef, bodies_now: int) -> bool:
    """Rebuild a segment without the bodies purged since (a delete, an overwrite): a small one
    at the first purge, a larger one once PURGE_FRACTION of its bodies are gone, so deleting
    a few old records does not re-upload megabytes each time."""
    gone = segment.bodies - bodies_now
    return gone > 0 and (segment.level == 0 or gone * PURGE_FRACTION >= segment.bodies)


def _merge_run(segments: list[SegmentRef]) -> tuple[list[SegmentRef] | None, bool]:
    """Adjacent loose (below full) segments of one author to merge into one, newest run first:
    the oldest of a run that together reach the target size (whatever their levels: sizes
    either side of a level bound alternate, and same-level runs would never get there), or
    FANIN adjacent ones of level 0. Else, past MAX_LOOSE_PER_AUTHOR loose ones, the oldest
    FANIN of one run; only loose segments scattered between full ones (each alone, after a
    purge) bring the full ones between them along (not as one). So a full segment is
    rewritten only for a purge or a new epoch, and each byte about once per level it climbs."""
    runs: list[list[SegmentRef]] = [[]]
    for segment in segments:
        if segment.level == FULL_LEVEL:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(segment)
    runs = [run for run in runs if run]
    for run in reversed(runs):
        total = 0
        for i, segment in enumerate(run):
            total += segment.size
            if i and total >= SEGMENT_TARGET_BYTES:
                return run[:i + 1], True
        small = 0
        for i in range(len(run) - 1, -1, -1):
            small = small + 1 if run[i].level == 0 else 0
            if small >= FANIN:
                return run[i:i + FANIN], True
    if sum(map(len, runs)) > MAX_LOOSE_PER_AUTHOR:
        longest = max(runs, key=len)
        if len(longest) >= FANIN:
            return longest[:FANIN], True
        loose = [i for i, s in enumerate(segments) if s.level < FULL_LEVEL]
        return segments[loose[0]:loose[FANIN - 1] + 1], False
    return None, False


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
    if len(blob) != ref.size or blake2b_256(blob) != ref.digest:
        raise ManifestRejected("bad-digest", "the segment is not the one the manifest lists")
    epoch = _epoch_of(blob)
    keys = keys_for_epoch(epoch)
    if keys is None or epoch != ref.epoch:
        raise ManifestRejected("unknown-epoch", f"no key for epoch {epoch}")
    content = _unpack_map(_open(keys.backup, blob, _segment_ad(circle_id, ref.id, epoch)))
    _check(SEGMENT_CONTENT_SCHEMA, content, "segment content")
    logs: list[dict[str, Any]] = content["logs"]
    if (content["author"] != ref.author or content["first"] != ref.first
            or content["last"] != ref.last):
        raise ManifestRejected("malformed", "the segment's content does not match its reference")
    return logs


def _first_seq(batch: dict[str, Any]) -> int:
    head = batch["head"]["seq"]
    return int(head) - len(batch["headers"]) + 1
