"""Chained manifests: a backup version whose cost follows the change, not the log (issue 20).

A manifest (backupset.py) stored inline in the signed backup blob costs its whole size at
every upload: the circle records and one reference per segment no index lists (about 13 KB
after a week at 1,000 entries a day), for an upload that carries one entry of about 1 KB.
Format 4 stores that full manifest once as a sealed **base** blob, then each upload as a
sealed **delta** blob (the references added, the ids dropped, the records only when they
changed) that pins the blob before it (the previous delta, or the base) by digest. The signed
backup blob then holds only the newest blob's reference and the chain's depth, so what an upload
stores is its delta and a small signed blob. Once the deltas together pass twice the base's
size (or CHAIN_MAX of them), the next upload stores a new base and the old chain is deleted: the
bytes spent on bases stay below half those spent on deltas. protocol/relay.md ("Backup chain").

Every blob is pinned by digest from the signed blob (directly, or through the deltas after
it), so the relay can neither alter, swap, withhold nor reorder one unnoticed; the signed
blob's version keeps RollbackGuard's check. The reader (meshd/backupblobs.py) fetches the
chain from the head back to the base, then applies the deltas oldest first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .backupset import (
    BLOB_REF_SCHEMA,
    CHAIN_MAX,
    CHAINED_FORMAT,
    INDEX_REF_SCHEMA,
    MANIFEST_SCHEMA,
    MAX_INDEXES,
    MAX_SEGMENTS,
    SEGMENT_REF_SCHEMA,
    BlobRef,
    ManifestRejected,
    _check,
    _open_listed,
)
from .crypto import RandomSource, blake2b_256
from .envelope import _pack, _seal
from .errors import LocalProtocolError
from .relay import MAX_SEGMENT_BYTES, SEGMENT_ID_BYTES
from .schema import Array, Bin, Int, Map, Nil

if TYPE_CHECKING:
    from .circle import EpochKeys


BASE_AD = b"meshd/backup-base/1\x00"
DELTA_AD = b"meshd/backup-delta/1\x00"
# Below this many packed bytes, the full manifest is stored inline (format 2 or 3): a base and
# a delta would cost more than it.
INLINE_MAX = 1024

_COUNT = Int(0, 2**63 - 1)
CHAINED_SCHEMA = Map({"format": _COUNT, "head": BLOB_REF_SCHEMA, "depth": Int(0, CHAIN_MAX), "segments": Nil()},
                     open_=True)
DELTA_SCHEMA = Map({"prev": BLOB_REF_SCHEMA},
                   {"add": Array(SEGMENT_REF_SCHEMA, 0, MAX_SEGMENTS),
                    "drop": Array(Bin(exact=SEGMENT_ID_BYTES), 0, MAX_SEGMENTS + MAX_INDEXES),
                    "indexes": Array(INDEX_REF_SCHEMA, 0, MAX_INDEXES), "records": Array(Bin())})


def is_chained(snapshot: dict[str, Any]) -> bool:
    return snapshot.get("format") == CHAINED_FORMAT


def chain_head(snapshot: dict[str, Any]) -> tuple[BlobRef, int]:
    """The head reference of a format-4 signed snapshot (its newest delta, or its base when
    it has none) and the number of deltas before the base; ManifestRejected."""
    _check(CHAINED_SCHEMA, snapshot, "chained backup manifest")
    return BlobRef.unpack(snapshot["head"]), snapshot["depth"]


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The delta content that turns the full snapshot old into new (both as Manifest.snapshot()
    makes them), without its "prev": by id, since the order of references carries nothing."""
    old_ids = {item[0] for item in old.get("segments", [])} | {item[0] for item in old.get("indexes", [])}
    new_ids = {item[0] for item in new.get("segments", [])} | {item[0] for item in new.get("indexes", [])}
    # Loose segments that went into a new index are dropped from the loose list too.
    moved = {item[0] for item in old.get("segments", [])} - {item[0] for item in new.get("segments", [])}
    out: dict[str, Any] = {
        "add": [item for item in new.get("segments", []) if item[0] not in old_ids],
        "drop": sorted((old_ids - new_ids) | moved),
        "indexes": [item for item in new.get("indexes", []) if item[0] not in old_ids],
    }
    if list(old.get("records", [])) != list(new.get("records", [])):
        out["records"] = list(new["records"])
    return {key: value for key, value in out.items() if value or key == "records"}


def apply(snapshot: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """The full snapshot after delta (format 2 or 3, as Manifest.from_snapshot reads it);
    ManifestRejected when the delta drops what is not there or adds what already is."""
    segments = {item[0]: item for item in snapshot.get("segments", [])}
    indexes = {item[0]: item for item in snapshot.get("indexes", [])}
    for dropped in delta.get("drop", []):
        if segments.pop(dropped, None) is None and indexes.pop(dropped, None) is None:
            raise ManifestRejected("malformed", "a backup delta drops an id the manifest does not list")
    for item in delta.get("add", []):
        if item[0] in segments or item[0] in indexes:
            raise ManifestRejected("malformed", "a backup delta adds an id listed already")
        segments[item[0]] = item
    for item in delta.get("indexes", []):
        if item[0] in segments or item[0] in indexes:
            raise ManifestRejected("malformed", "a backup delta adds an id listed already")
        indexes[item[0]] = item
    out: dict[str, Any] = {"format": 3 if indexes else 2,
                           "records": delta.get("records", snapshot.get("records", [])), "logs": [],
                           "segments": list(segments.values())}
    if indexes:
        out["indexes"] = list(indexes.values())
    return out


def _ad(prefix: bytes, circle_id: bytes, blob_id: bytes, epoch: int) -> bytes:
    return prefix + circle_id + blob_id + epoch.to_bytes(4, "big")


def _seal_blob(prefix: bytes, keys: EpochKeys, circle_id: bytes, blob_id: bytes, content: dict[str, Any],
               rng: RandomSource) -> tuple[bytes, BlobRef]:
    if len(blob_id) != SEGMENT_ID_BYTES:
        raise LocalProtocolError("a backup chain blob needs a 16-byte id")
    blob = _seal(keys.backup, keys.number, _ad(prefix, circle_id, blob_id, keys.number), _pack(content), rng)
    if len(blob) > MAX_SEGMENT_BYTES:
        raise LocalProtocolError(f"a backup chain blob of {len(blob)} bytes exceeds {MAX_SEGMENT_BYTES}")
    return blob, BlobRef(blob_id, blake2b_256(blob), len(blob), keys.number)


def seal_base(*, keys: EpochKeys, circle_id: bytes, blob_id: bytes, snapshot: dict[str, Any],
              rng: RandomSource) -> tuple[bytes, BlobRef]:
    """Seal a full manifest snapshot (format 2 or 3) as a base blob."""
    return _seal_blob(BASE_AD, keys, circle_id, blob_id, snapshot, rng)


def seal_delta(*, keys: EpochKeys, circle_id: bytes, blob_id: bytes, prev: BlobRef, delta: dict[str, Any],
               rng: RandomSource) -> tuple[bytes, BlobRef]:
    """Seal diff()'s content chained on prev (the previous delta, or the base)."""
    return _seal_blob(DELTA_AD, keys, circle_id, blob_id, {**delta, "prev": prev.pack()}, rng)


def open_base(blob: bytes, *, circle_id: bytes, ref: BlobRef,
              keys_for_epoch: Callable[[int], EpochKeys | None]) -> dict[str, Any]:
    """The full snapshot in a base blob fetched for ref; ManifestRejected unless it is exactly that."""
    content = _open_listed(blob, ref, keys_for_epoch, lambda epoch: _ad(BASE_AD, circle_id, ref.id, epoch),
                           "backup base")
    _check(MANIFEST_SCHEMA, content, "backup base")
    if content.get("format") not in (2, 3) or content.get("logs"):
        raise ManifestRejected("malformed", "a backup base holds a format-2 or 3 manifest without logs")
    return content


def open_delta(blob: bytes, *, circle_id: bytes, ref: BlobRef,
               keys_for_epoch: Callable[[int], EpochKeys | None]) -> tuple[dict[str, Any], BlobRef]:
    """A delta blob fetched for ref: its content and the reference of the blob before it."""
    content = _open_listed(blob, ref, keys_for_epoch, lambda epoch: _ad(DELTA_AD, circle_id, ref.id, epoch),
                           "backup delta")
    _check(DELTA_SCHEMA, content, "backup delta")
    return content, BlobRef.unpack(content["prev"])
