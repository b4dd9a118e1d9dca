"""Chained manifests (format 4, protocol/relay.md "Backup chain"): a delta turns one full
manifest into the next, and a base or delta blob opens only as exactly what pins it."""

from __future__ import annotations

import pytest

from meshd.protocol.backupchain import (
    apply,
    chain_head,
    diff,
    open_base,
    open_delta,
    seal_base,
    seal_delta,
)
from meshd.protocol.backupset import (
    BlobRef,
    Chain,
    IndexRef,
    Manifest,
    ManifestRejected,
    SegmentRef,
)
from meshd.protocol.envelope import EnvelopeRejected

from .test_backupset import ALICE, BOB, CIRCLE, EPOCH1, KEYS, RNG


def ref(author: bytes, first: int, last: int, size: int = 2000) -> SegmentRef:
    return SegmentRef(RNG(16), RNG(32), author, first, last, size, 1, last - first + 1)


def test_a_delta_turns_the_old_snapshot_into_the_new_one() -> None:
    a1, a2, b1 = ref(ALICE, 1, 10), ref(ALICE, 11, 20), ref(BOB, 1, 5)
    index = IndexRef(RNG(16), RNG(32), 500, 1, 2)
    old = Manifest(records=(b"r1",), segments=(a1, a2, b1)).snapshot()
    merged = ref(ALICE, 1, 20)
    new = {**Manifest(records=(b"r1", b"r2"), segments=(merged,)).snapshot(),
           "format": 3, "indexes": [index.pack()]}
    delta = diff(old, new)
    assert sorted(delta["drop"]) == sorted([a1.id, a2.id, b1.id])
    assert delta["add"] == [merged.pack()] and delta["indexes"] == [index.pack()]
    assert delta["records"] == [b"r1", b"r2"]
    out = apply(old, delta)
    assert Manifest.from_snapshot(out).segments == (merged,)
    assert out["indexes"] == [index.pack()] and out["records"] == [b"r1", b"r2"]
    assert "records" not in diff(new, new), "records go into a delta only when they changed"


def test_a_delta_that_drops_what_is_not_listed_or_adds_what_is_is_rejected() -> None:
    a1 = ref(ALICE, 1, 10)
    snapshot = Manifest(segments=(a1,)).snapshot()
    with pytest.raises(ManifestRejected, match="drops"):
        apply(snapshot, {"add": [], "drop": [RNG(16)], "indexes": []})
    with pytest.raises(ManifestRejected, match="adds"):
        apply(snapshot, {"add": [a1.pack()], "drop": [], "indexes": []})


def test_base_and_delta_blobs_open_only_as_what_pins_them() -> None:
    snapshot = Manifest(records=(b"r",), segments=(ref(ALICE, 1, 3),)).snapshot()
    base_blob, base = seal_base(keys=EPOCH1, circle_id=CIRCLE, blob_id=RNG(16), snapshot=snapshot, rng=RNG)
    assert open_base(base_blob, circle_id=CIRCLE, ref=base, keys_for_epoch=KEYS.get) == snapshot
    delta = {"add": [ref(ALICE, 4, 4).pack()], "drop": [], "indexes": []}
    delta_blob, head = seal_delta(keys=EPOCH1, circle_id=CIRCLE, blob_id=RNG(16), prev=base, delta=delta, rng=RNG)
    content, prev = open_delta(delta_blob, circle_id=CIRCLE, ref=head, keys_for_epoch=KEYS.get)
    assert prev == base and content["add"] == delta["add"]
    tampered = delta_blob[:-1] + bytes([delta_blob[-1] ^ 1])
    with pytest.raises(ManifestRejected, match="bad-digest"):
        open_delta(tampered, circle_id=CIRCLE, ref=head, keys_for_epoch=KEYS.get)
    with pytest.raises(ManifestRejected, match="bad-digest"):  # another blob served for the head
        open_delta(base_blob, circle_id=CIRCLE, ref=head, keys_for_epoch=KEYS.get)
    # The same blob under another id (or as the other kind) does not authenticate.
    moved = BlobRef(RNG(16), head.digest, head.size, head.epoch)
    with pytest.raises(EnvelopeRejected, match="bad-mac"):
        open_delta(delta_blob, circle_id=CIRCLE, ref=moved, keys_for_epoch=KEYS.get)
    with pytest.raises(EnvelopeRejected, match="bad-mac"):
        open_base(delta_blob, circle_id=CIRCLE, ref=head, keys_for_epoch=KEYS.get)
    signed = Chain(base, (head,)).signed()
    assert signed["format"] == 4 and chain_head(signed) == (head, 1)
    assert chain_head(Chain(base).signed()) == (base, 0)
    with pytest.raises(ManifestRejected, match="malformed"):
        chain_head({"format": 4, "head": [b"short", head.digest, 1, 1], "depth": 0})
    with pytest.raises(ManifestRejected, match="malformed"):
        chain_head({"format": 4, "head": head.pack(), "depth": 10**6})


def test_a_reader_of_formats_1_to_3_rejects_a_chained_snapshot_instead_of_reading_it_empty() -> None:
    """Such a reader ignores `format`: without the nil `segments` it would read no records and
    no segments, and its device would upload the whole log again over the chain."""
    signed = Chain(BlobRef(RNG(16), RNG(32), 100, 1)).signed()
    with pytest.raises(ManifestRejected, match="malformed"):
        Manifest.from_snapshot(signed)  # the format 1-3 reader, unchanged since format 3
