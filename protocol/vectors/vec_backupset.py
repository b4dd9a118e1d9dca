"""Vectors for the incremental backup: a backup segment and the format-2 manifest naming it."""

from __future__ import annotations

from typing import Any

from vec_common import Device, Draws, Queue, deterministic_sealed_boxes, document, hx, pack
from vec_log import log_entries

from meshd.protocol.backupset import (
    Manifest,
    ManifestRejected,
    SegmentRef,
    open_segment,
    seal_segment,
)
from meshd.protocol.circle import Circle, epoch_keys
from meshd.protocol.crypto import blake2b_256
from meshd.protocol.envelope import EnvelopeRejected, open_backup, seal_backup
from meshd.protocol.log import batch_message, entry_hash, sign_head


def backup_segment_vectors() -> dict[str, Any]:
    rng = Draws("backup-segment")
    laptop = Device("laptop", rng)
    with deterministic_sealed_boxes(rng):
        circle = Circle.create(laptop.signer, laptop.info, rng)
    epoch_key = circle.epoch_key(laptop.dh)
    keys = epoch_keys(1, epoch_key)
    entries = log_entries(laptop.signer, [(1 << 16, "notes", "n1", "put", b"first"),
                                          (2 << 16, "notes", "n2", "put", b"second")])
    headers = [bytes.fromhex(e["header"]) for e in entries]
    head = sign_head(laptop.signer, 2, entry_hash(headers[-1]))
    batch = batch_message(laptop.key, headers, [b"first", b"second"], head)
    segment_id, nonce = rng(16), rng(24)
    blob, ref = seal_segment(keys=keys, circle_id=circle.circle_id, segment_id=segment_id,
                             author=laptop.key, batches=[batch], rng=Queue(nonce))
    plaintext = pack({"author": laptop.key, "first": 1, "last": 2, "logs": [batch]})
    assert ref.digest == blake2b_256(blob)
    assert open_segment(blob, circle_id=circle.circle_id, ref=ref, keys_for_epoch={1: keys}.get) == [batch]
    manifest = Manifest().replaced(circle.records(), [ref], set())
    manifest_nonce = rng(24)
    manifest_blob = seal_backup(keys=keys, circle_id=circle.circle_id, signer=laptop.signer, version=3,
                                snapshot=manifest.snapshot(), rng=Queue(manifest_nonce))
    opened = open_backup(manifest_blob, circle_id=circle.circle_id, version=3, keys_for_epoch={1: keys}.get,
                         is_signer_allowed={laptop.key}.__contains__)
    assert Manifest.from_snapshot(opened.snapshot) == manifest

    def verdict(served: bytes, listed: SegmentRef) -> str:
        try:
            open_segment(served, circle_id=circle.circle_id, ref=listed, keys_for_epoch={1: keys}.get)
        except (ManifestRejected, EnvelopeRejected) as err:
            return err.reason
        return "ok"

    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    moved = SegmentRef(bytes(16), *ref.pack()[1:])
    return document(
        "a backup segment and the format-2 manifest that lists it",
        ["protocol/relay.md#backup-segment", "protocol/relay.md#backup-blob",
         "protocol/relay.md#incremental-backup", "protocol/logs.md#sync-messages"],
        "segment = 01 || epoch u32 || nonce || XChaCha20-Poly1305-IETF(backup key, nonce, "
        "'meshd/backup-segment/1\\0' || circle_id || segment id || epoch u32, msgpack({author, "
        "first, last, logs})). The manifest is a backup blob whose snapshot is {format: 2, records, "
        "logs: [], segments: [[id, BLAKE2b-256(segment), author, first, last, len(segment), epoch]]}.",
        signer=laptop.describe(), circle_id=hx(circle.circle_id),
        epoch={"number": 1, "epoch_key": hx(epoch_key), "backup": hx(keys.backup)},
        segment_id=hx(segment_id), nonce=hx(nonce),
        associated_data=hx(b"meshd/backup-segment/1\x00" + circle.circle_id + segment_id + (1).to_bytes(4, "big")),
        plaintext=hx(plaintext), segment=hx(blob), digest=hx(ref.digest), reference=[
            hx(v) if isinstance(v, bytes) else v for v in ref.pack()],
        manifest_version=3, manifest_snapshot=hx(pack(manifest.snapshot())),
        manifest_nonce=hx(manifest_nonce), manifest_blob=hx(manifest_blob),
        rejections=[{"name": "one bit flipped", "segment": hx(flipped), "reason": verdict(flipped, ref)},
                    {"name": "listed under another id", "segment_id": hx(moved.id),
                     "reason": verdict(blob, moved)}],
    )
