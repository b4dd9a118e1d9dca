"""Incremental backups, the planning: which segments to build next, compaction, who uploads.

meshd/protocol/backupset.py holds what is planned over (the manifest, segment references,
sealing); meshd/backup.py executes the plans. An upload costs what changed: next_build()
says which segment to build next (the entries no segment covers yet, re-seals, then
compaction merges). Compaction is size-tiered: the loose segments of an author merge into a
full one once they reach the target size together, so an entry is uploaded twice (new, then
merged into a full segment), and past MAX_LOOSE_PER_AUTHOR loose ones the oldest half merge
first (tiny entries: three times). Many loose segments cost the manifest little since it is
stored as a chain of deltas (backupchain.py): the tier of FANIN tiny ones merged into one,
which made sparse writes go up three times, is gone (issue 20). protocol/relay.md ("Incremental backup").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from .backupset import FULL_LEVEL, SEGMENT_TARGET_BYTES, Manifest, SegmentRef

FANIN = 32
# Past this many segments below full size per author, the oldest half of the longest run merge
# anyway (entries of a few hundred bytes, uploaded one at a time, reach it before 1 MiB). A
# thousand one-entry segments is what 1 MiB of 1 KB entries uploaded one by one makes.
MAX_LOOSE_PER_AUTHOR = 1024
# Most of a segment's own bytes beyond its entries (seal, map, the batch's signed head: about
# 305). A merge of n parts waits until their sizes reach the target plus n x PART_BYTES, so
# the merged segment is full (the 128 KiB between the target and the full level absorb the
# rest for up to 2,600 parts). Counting the parts' sizes alone, a merge of 700 one-entry
# segments came out below full (about 840 KiB) and was merged once more (issue 20).
PART_BYTES = 256
# A segment of level 1 or full is rebuilt once 1/PURGE_FRACTION of its bodies were purged.
PURGE_FRACTION = 8


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
    listed = manifest.by_author()  # sorted once: of() per rule made planning O(n log n) each
    for author, tip in mine:
        segments = listed.get(author, [])
        if segments and tip >= max(s.last for s in segments) and any(s.epoch != epoch for s in segments):
            return Build(author, 0, tip, tuple(s.id for s in segments))
    for author, tip in mine:
        covered = _covered(listed.get(author, []))
        if tip > covered:
            return Build(author, covered, tip)
    for segment in manifest.segments:
        now = (bodies_now or {}).get(segment.id)
        if (now is not None and (authors is None or segment.author in authors)
                and segment.last <= vector.get(segment.author, 0) and _purge_due(segment, now)):
            return Build(segment.author, segment.first - 1, segment.last, (segment.id,), whole=True)
    for author, tip in mine:
        run, whole = _merge_run(listed.get(author, []))
        if run and run[-1].last <= tip:
            return Build(author, run[0].first - 1, run[-1].last, tuple(s.id for s in run), whole)
    return None


def fold_and_plan(manifest: Manifest, refs: list[SegmentRef], build: Build, vector: dict[bytes, int], epoch: int,
                  bodies_now: Mapping[bytes, int], authors: Collection[bytes]) -> tuple[Manifest, Build | None]:
    """The manifest with build's segments folded in, and the build after it: one step of an
    upload, in one trip to the shell's worker thread."""
    manifest = manifest.replaced(list(manifest.records), refs, set(build.replaces))
    return manifest, next_build(manifest, vector, epoch, bodies_now, authors)


def lagging(manifest: Manifest, vector: dict[bytes, int], epoch: int) -> set[bytes]:
    """Authors whose entries this device holds but the manifest does not (yet): entries no
    segment covers, or segments of an older epoch that this device holds entirely (what
    next_build can re-seal; a removed member's entries past its removal point, dropped
    here, stay in the segments written before: protocol/logs.md)."""
    def resealable(author: bytes, tip: int) -> bool:  # next_build's first rule
        segments = manifest.of(author)
        return any(s.epoch != epoch for s in segments) and tip >= max(s.last for s in segments)

    return {author for author, tip in vector.items()
            if manifest.covered(author) < tip or resealable(author, tip)}


def lag_marks(manifest: Manifest, vector: dict[bytes, int], epoch: int) -> dict[bytes, tuple[int, int]]:
    """Each lagging author's mark in the manifest: (entries covered, segments of an older
    epoch). The shell times how long a mark stays unchanged (meshd/backup.py)."""
    listed = manifest.by_author()
    return {author: (_covered(listed.get(author, [])), sum(s.epoch != epoch for s in listed.get(author, [])))
            for author in lagging(manifest, vector, epoch)}


def settled(base: Manifest, built: Manifest, records: list[bytes], uploaded: list[bytes]) -> Manifest | None:
    """The manifest a round stores (built, with the circle's current records), or None when
    the round changed nothing: no upload, the same segments and records as base."""
    if not uploaded and built.segments == base.segments and list(built.records) == records:
        return None
    return built.replaced(records, [], set())


def unlisted(manifest: Manifest, ids: Collection[bytes]) -> list[bytes]:
    """The ids (sorted) among `ids` that no blob of manifest is: a round's uploads a stored
    manifest does not keep, or the pending ones an interrupted upload left."""
    listed = manifest.blob_ids()
    return sorted(i for i in ids if i not in listed)


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
    # Their indexes stay where they list only segments kept; ours are dropped (their blobs are
    # deleted with the rest this round uploaded and the result does not list).
    return theirs.with_segments(tuple(kept + [s for s in ours.segments if s.author in changed]), ours.records)


def _covered(segments: list[SegmentRef]) -> int:
    """Manifest.covered() over one author's segments as by_author() lists them."""
    through = 0
    for segment in segments:
        if segment.first > through + 1:
            break
        through = max(through, segment.last)
    return through


def _purge_due(segment: SegmentRef, bodies_now: int) -> bool:
    """Rebuild a segment without the bodies purged since (a delete, an overwrite): a small one
    at the first purge, a larger one once PURGE_FRACTION of its bodies are gone, so deleting
    a few old records does not re-upload megabytes each time."""
    gone = segment.bodies - bodies_now
    return gone > 0 and (segment.level == 0 or gone * PURGE_FRACTION >= segment.bodies)


def _merge_run(segments: list[SegmentRef]) -> tuple[list[SegmentRef] | None, bool]:
    """Adjacent loose (below full) segments of one author to merge into one, newest run first:
    the oldest of a run that together reach the target size, their own bytes (PART_BYTES
    each) not counted (whatever their levels: sizes
    either side of a level bound alternate, and same-level runs would never get there). Else,
    past MAX_LOOSE_PER_AUTHOR loose ones, the oldest half of the longest run (FANIN at least);
    only loose segments scattered between full ones (each alone, after a purge) bring the full
    ones between them along (not as one). So a full segment is rewritten only for a purge or
    a new epoch, and each byte goes up twice (new, then in a full segment) unless its entries
    are so small that MAX_LOOSE_PER_AUTHOR of them stay below the target."""
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
            if i and total >= SEGMENT_TARGET_BYTES + (i + 1) * PART_BYTES:
                return run[:i + 1], True
    if sum(map(len, runs)) > MAX_LOOSE_PER_AUTHOR:
        longest = max(runs, key=len)
        if len(longest) >= FANIN:
            return longest[:max(FANIN, len(longest) // 2)], True
        loose = [i for i, s in enumerate(segments) if s.level < FULL_LEVEL]
        return segments[loose[0]:loose[FANIN - 1] + 1], False
    return None, False
