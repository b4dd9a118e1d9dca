"""The backup manifest's index blobs: the manifest stored at each upload stays small as the
log grows, and an index is checked like a segment."""

from __future__ import annotations

import pytest

from meshd.protocol.backupplan import next_build, rebase
from meshd.protocol.backupset import (
    FULL_LEVEL,
    INDEX_REFS,
    IndexRef,
    Manifest,
    ManifestRejected,
    SegmentRef,
    open_index,
    seal_index,
)
from meshd.protocol.envelope import EnvelopeRejected, _pack

from .test_backupset import ALICE, BOB, CIRCLE, EPOCH1, KEYS, RNG, Simulator

MIB = 1024 * 1024


def index_all(manifest: Manifest, stored: dict[bytes, bytes]) -> Manifest:
    """What the shell does before storing a manifest (meshd/backup.py _index)."""
    while (refs := manifest.to_index()) is not None:
        index_id = RNG(16)
        blob, index = seal_index(keys=EPOCH1, circle_id=CIRCLE, index_id=index_id, refs=refs, rng=RNG)
        stored[index_id] = blob
        manifest = manifest.with_index(index, refs)
    return manifest


def read_all(manifest: Manifest, stored: dict[bytes, bytes]) -> Manifest:
    """What meshd/backupblobs.py read_indexes does with the relay's blobs."""
    for index in manifest.unread():
        manifest = manifest.resolved(index, open_index(stored[index.id], circle_id=CIRCLE, ref=index,
                                                       keys_for_epoch=KEYS.get))
    return manifest


def test_the_manifest_stored_at_each_upload_does_not_grow_a_reference_per_segment() -> None:
    """Issue 20: the manifest (about 106 bytes per segment) is stored again at every upload,
    every few seconds while entries come: one week at 100,000 entries a day (about 850 full
    segments) made each upload cost 90 KB for a few KB of entries. Indexed, the manifest
    holds one reference per INDEX_REFS full segments."""
    sim = Simulator()
    stored: dict[bytes, bytes] = {}
    sizes = []
    tip = 0
    for _ in range(330):  # 330 uploads of 3 MB: about 1,000 full segments
        tip += 3 * MIB // 1000
        sim.upload({ALICE: tip})
        sim.manifest = index_all(sim.manifest, stored)
        sizes.append(len(_pack(sim.manifest.snapshot())))
    full = sum(1 for s in sim.manifest.segments if s.level == FULL_LEVEL)
    assert full >= 900
    # Unindexed that is about 106 KB; indexed, the loose ones and 15 index references.
    assert max(sizes) < (INDEX_REFS + 40) * 110, max(sizes)
    assert len(sim.manifest.indexes) == full // INDEX_REFS
    # Read back from the snapshot and the index blobs, it is the same manifest.
    opened = read_all(Manifest.from_snapshot(sim.manifest.snapshot()), stored)
    assert sorted(opened.segments, key=lambda s: s.id) == sorted(sim.manifest.segments, key=lambda s: s.id)
    assert opened.covered(ALICE) == tip
    assert next_build(opened, {ALICE: tip}, 1) is None, "nothing to rebuild once read back"


def test_an_unread_index_cannot_be_planned_over_nor_stored() -> None:
    sim = Simulator()
    stored: dict[bytes, bytes] = {}
    sim.upload({ALICE: INDEX_REFS * 1100})
    manifest = Manifest.from_snapshot(index_all(sim.manifest, stored).snapshot())
    assert len(manifest.unread()) == 1
    with pytest.raises(Exception, match="not read"):
        manifest.snapshot()
    with pytest.raises(Exception, match="not read"):
        manifest.replaced([], [], set())


def test_rewriting_an_indexed_segment_drops_its_index_and_lists_the_rest_again() -> None:
    sim = Simulator()
    stored: dict[bytes, bytes] = {}
    sim.upload({ALICE: INDEX_REFS * 1100})
    manifest = index_all(sim.manifest, stored)
    first = min((s for s in manifest.segments if s.level == FULL_LEVEL), key=lambda s: s.first)
    resealed = manifest.replaced([], [sim.ref(ALICE, first.first, first.last, 1)], {first.id})
    assert resealed.indexes == () and resealed.covered(ALICE) == manifest.covered(ALICE)
    listed = {tuple(item)[0] for item in resealed.snapshot()["segments"]}
    assert listed == {s.id for s in resealed.segments}, "every segment is listed once more"
    # A rebase keeps the other device's indexes that still hold, and drops ours.
    base = manifest.replaced([], [sim.ref(BOB, 1, 5, 1)], set())
    ours = base.replaced([], [sim.ref(BOB, 6, 9, 1)], set())
    theirs = base.replaced([], [sim.ref(ALICE, INDEX_REFS * 1100 + 1, INDEX_REFS * 1100 + 3, 1)], set())
    rebased = rebase(base, theirs, ours, {BOB})
    assert rebased is not None and rebased.indexes == theirs.indexes and rebased.covered(BOB) == 9


def test_an_index_opens_only_as_the_manifest_lists_it() -> None:
    refs = [SegmentRef(bytes([i]) * 16, bytes(32), ALICE, i * 10 + 1, i * 10 + 10, MIB, 1, 10) for i in range(3)]
    blob, index = seal_index(keys=EPOCH1, circle_id=CIRCLE, index_id=bytes([9]) * 16, refs=refs, rng=RNG)
    assert open_index(blob, circle_id=CIRCLE, ref=index, keys_for_epoch=KEYS.get) == refs
    for served in (blob[:-1] + bytes([blob[-1] ^ 1]), blob[:-1]):  # altered, cut
        with pytest.raises(ManifestRejected) as rejected:
            open_index(served, circle_id=CIRCLE, ref=index, keys_for_epoch=KEYS.get)
        assert rejected.value.reason == "bad-digest"
    with pytest.raises(EnvelopeRejected):  # the same bytes under another id: the AEAD says no
        open_index(blob, circle_id=CIRCLE, ref=IndexRef(bytes([1]) * 16, *index.pack()[1:]), keys_for_epoch=KEYS.get)
    miscounted = IndexRef(index.id, index.digest, index.size, index.epoch, 2)
    with pytest.raises(ManifestRejected):
        open_index(blob, circle_id=CIRCLE, ref=miscounted, keys_for_epoch=KEYS.get)
    # A manifest naming an id both as a segment and as an index, or a segment twice through
    # an index, is malformed.
    snapshot = {"format": 3, "records": [], "logs": [], "segments": [refs[0].pack()], "indexes": [
        IndexRef(refs[0].id, index.digest, index.size, 1, 3).pack()]}
    with pytest.raises(ManifestRejected):
        Manifest.from_snapshot(snapshot)
    listed = Manifest.from_snapshot({**snapshot, "indexes": [index.pack()]})
    with pytest.raises(ManifestRejected):
        listed.resolved(listed.indexes[0], refs)
