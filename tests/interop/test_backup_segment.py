"""The independent checker for backup_segment.json, from protocol/relay.md ("Backup segment",
"Backup blob", "Incremental backup") with PyNaCl, hashlib and msgpack only (reference.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import circle_rules as circle
from . import reference as ref

DOC = json.loads((Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "backup_segment.json").read_text())
SEGMENT_AD = b"meshd/backup-segment/1\x00"


def b(text: str) -> bytes:
    return bytes.fromhex(text)


def open_segment(blob: bytes, reference: list[Any], circle_id: bytes, keys: dict[int, bytes]) -> tuple[str, Any]:
    """relay.md "Backup segment": digest and size, epoch, AEAD, then the content's fields."""
    segment_id, digest, author, first, last, size, epoch, _bodies = reference
    if len(blob) != size or ref.blake2b_256(blob) != digest:
        return "bad-digest", None
    number = int.from_bytes(blob[1:5], "big")
    if blob[0] != 1 or number != epoch or number not in keys:
        return "unknown-epoch", None
    plaintext = ref.xchacha_decrypt(keys[number], blob[5:ref.HEADER], SEGMENT_AD + circle_id + segment_id
                                    + ref.u32(number), blob[ref.HEADER:])
    if plaintext is None:
        return "bad-mac", None
    content = ref.unpack(plaintext)
    if (content.get("author"), content.get("first"), content.get("last")) != (author, first, last):
        return "malformed", None
    return "ok", content["logs"]


def test_the_backup_segment_and_its_manifest() -> None:
    signer = DOC["signer"]
    circle_id, number = b(DOC["circle_id"]), DOC["epoch"]["number"]
    key = ref.epoch_subkeys(b(DOC["epoch"]["epoch_key"]), number)["backup"]
    assert key == b(DOC["epoch"]["backup"])
    segment_id = b(DOC["segment_id"])
    ad = SEGMENT_AD + circle_id + segment_id + ref.u32(number)
    assert ad == b(DOC["associated_data"])
    assert ref.seal(key, number, b(DOC["nonce"]), ad, b(DOC["plaintext"])) == b(DOC["segment"])
    segment = b(DOC["segment"])
    reference = [b(v) if isinstance(v, str) else v for v in DOC["reference"]]
    assert reference == [segment_id, ref.blake2b_256(segment), b(signer["sign_key"]), 1, 2, len(segment), number, 2]
    assert reference[1] == b(DOC["digest"])

    # The manifest: a backup blob (relay.md "Backup blob") whose snapshot is format 2.
    opened = ref.open_sealed(b(DOC["manifest_blob"]), keys={number: key}, ad_prefix=ref.BACKUP_AD,
                             signature_context=ref.BACKUP_SIGNATURE, scope=circle_id,
                             allowed=[b(signer["sign_key"])])
    assert (opened.reason, opened.number) == ("ok", DOC["manifest_version"])
    snapshot = opened.payload
    assert ref.pack(snapshot) == b(DOC["manifest_snapshot"])
    assert set(snapshot) == {"format", "records", "logs", "segments"} and snapshot["format"] == 2
    assert snapshot["logs"] == [] and snapshot["segments"] == [reference]
    state, _ = circle.from_records(snapshot["records"])
    assert b(signer["sign_key"]) in state.members

    # The segment it lists opens to log.entries batches that verify as from a peer.
    reason, logs = open_segment(segment, reference, circle_id, {number: key})
    assert reason == "ok" and len(logs) == 1
    assert sum(body is not None for batch in logs for body in batch["bodies"]) == reference[7]
    for batch in logs:
        assert set(batch) == {"t", "author", "headers", "bodies", "head"} and batch["t"] == "log.entries"
        assert ref.verify_batch(batch, allowed=list(state.members)) == "ok"
    for rejection in DOC["rejections"]:
        served = b(rejection.get("segment", DOC["segment"]))
        listed = [b(rejection["segment_id"]), *reference[1:]] if "segment_id" in rejection else reference
        assert open_segment(served, listed, circle_id, {number: key})[0] == rejection["reason"], rejection["name"]
