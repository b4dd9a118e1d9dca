"""A backup's blobs at the relay besides uploading them: reading a manifest whole (opening
it, its chain of base and delta blobs when format 4, then the index blobs it lists), and
deleting the blobs no manifest lists any more.

A manifest lists the newest segments itself and the full ones through index blobs
(meshd/protocol/backupset.py). The device's upload (meshd/backup.py), the restore
(meshd/restore.py) and recovery's preview (meshd/relay/recovery.py) all need every segment,
so they read each index here: fetched from the relay that served the manifest, checked
against its digest and opened in a worker thread. An index lists at most 64 references,
so this costs about 7 KB per 64 MiB of log.

Deleting is best effort: an id the relay did not confirm stays recorded as pending
(meshd/backup.py) and is deleted by a later upload.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .backupstate import REQUEST_TIMEOUT_S, BackupFailed, BackupHost, off_loop
from .protocol.backupchain import apply, chain_head, is_chained, open_base, open_delta
from .protocol.backupset import (
    BlobRef,
    Chain,
    Manifest,
    SegmentRef,
    open_index,
)
from .protocol.circle import EpochKeys, epoch_keys
from .protocol.envelope import open_backup
from .protocol.relay import MAX_SEGMENT_IDS, RelayError

if TYPE_CHECKING:
    from .relay.client import RelayClient
    from .relay.session import RelaySession

log = logging.getLogger(__name__)


async def fetch_blob(source: RelayClient | RelaySession, blob_id: bytes, what: str) -> bytes:
    """A backup blob (a segment or an index) the manifest lists; BackupFailed when the relay
    no longer has it."""
    with trio.fail_after(REQUEST_TIMEOUT_S):
        blob = await source.segment_get(blob_id)
    if blob is None:
        raise BackupFailed(f"the relay lost backup {what} {blob_id.hex()}")
    return blob


async def read_indexes(
    source: RelayClient | RelaySession, circle_id: bytes, manifest: Manifest,
    keys_for_epoch: Callable[[int], EpochKeys | None], cache: dict[bytes, list[SegmentRef]] | None = None,
) -> Manifest:
    """The manifest with every index it lists read (cache: index id -> its references, kept
    to the manifest's current indexes; an index's content never changes under its id)."""
    for index in manifest.unread():
        refs = cache.get(index.id) if cache is not None else None
        if refs is None:
            blob = await fetch_blob(source, index.id, "index")
            refs = await trio.to_thread.run_sync(partial(
                open_index, blob, circle_id=circle_id, ref=index, keys_for_epoch=keys_for_epoch))
        manifest = await off_loop(manifest.resolved, index, refs)
        if cache is not None:
            cache[index.id] = refs
    if cache is not None:
        for stale in await off_loop(_stale, manifest, frozenset(cache)):
            del cache[stale]
    return manifest


def _stale(manifest: Manifest, cached: frozenset[bytes]) -> list[bytes]:
    """The cached index ids the manifest no longer lists."""
    current = {index.id for index in manifest.indexes}
    return [key for key in cached if key not in current]


# Chain heads kept per relay (RelayBackup.chains): the one this device stored last and the
# one it read last (another device's, after a conflict) are what the next read meets.
CHAIN_HEADS_KEPT = 2


def remember_head(heads: dict[BlobRef, tuple[dict[str, Any], Chain]], full: dict[str, Any], chain: Chain) -> None:
    """Keep the full snapshot at chain's head (the newest CHAIN_HEADS_KEPT heads)."""
    head = chain.deltas[-1] if chain.deltas else chain.base
    heads.pop(head, None)
    heads[head] = (full, chain)
    while len(heads) > CHAIN_HEADS_KEPT:
        del heads[next(iter(heads))]


async def read_manifest(
    source: RelayClient | RelaySession, circle_id: bytes, snapshot: dict[str, Any],
    keys_for_epoch: Callable[[int], EpochKeys | None],
    heads: dict[BlobRef, tuple[dict[str, Any], Chain]] | None = None,
) -> Manifest:
    """The manifest an opened backup's snapshot holds, its indexes not read yet: inline
    (format 1 to 3), or (format 4, meshd/protocol/backupchain.py) its base blob with every
    delta of its chain applied, fetched from the head back to the base (each pins the one
    before by digest) and opened in a worker thread.

    heads (RelayBackup.chains): the full snapshot at chain heads read or stored before. The
    walk back stops at one of them (its reference pins the same bytes, digest included) if
    its depth agrees with the signed blob's, so only the blobs stored since are fetched
    (issue 20: two devices uploading in turn read each other's whole chain at every
    conflict); the head read is kept in it."""
    if not is_chained(snapshot):
        return await off_loop(Manifest.from_snapshot, snapshot)
    at, depth = chain_head(snapshot)
    deltas: list[tuple[BlobRef, dict[str, Any]]] = []
    known = None
    while len(deltas) < depth:
        kept = heads.get(at) if heads is not None else None
        if kept is not None and len(kept[1].deltas) + len(deltas) == depth:
            known = kept
            break
        blob = await fetch_blob(source, at.id, "delta")
        content, prev = await trio.to_thread.run_sync(partial(
            open_delta, blob, circle_id=circle_id, ref=at, keys_for_epoch=keys_for_epoch))
        deltas.append((at, content))
        at = prev
    if known is None and heads is not None and (kept := heads.get(at)) is not None and not kept[1].deltas:
        known = kept  # the base itself, read or stored before
    if known is not None:
        full, chain = known
        base, older = chain.base, chain.deltas
    else:
        base, older = at, ()
        blob = await fetch_blob(source, base.id, "base")
        full = await trio.to_thread.run_sync(partial(
            open_base, blob, circle_id=circle_id, ref=base, keys_for_epoch=keys_for_epoch))
    full, manifest = await off_loop(_applied, full, [content for _, content in reversed(deltas)])
    chain = Chain(base, older + tuple(ref for ref, _ in reversed(deltas)))
    if heads is not None:
        remember_head(heads, full, chain)
    return replace(manifest, chain=chain)


def _applied(full: dict[str, Any], deltas: list[dict[str, Any]]) -> tuple[dict[str, Any], Manifest]:
    """The full snapshot of a chain and its manifest: its base's (or a kept head's) snapshot
    with each delta applied, oldest first."""
    for content in deltas:
        full = apply(full, content)
    return full, Manifest.from_snapshot(full)


async def open_manifest(daemon: BackupHost, source: RelayClient, blob: bytes, version: int,
                        cache: dict[bytes, list[SegmentRef]],
                        heads: dict[BlobRef, tuple[dict[str, Any], Chain]] | None = None) -> Manifest:
    """A device's own circle's backup blob at `version`, opened, checked and read whole
    (cache: the indexes read before; heads: the chain heads known, see read_manifest)."""
    circle = daemon.circle
    readable = circle.readable_epochs(daemon.identity.noise)

    def keys_for_epoch(n: int) -> EpochKeys | None:
        return epoch_keys(n, readable[n]) if n in readable else None

    backup = await trio.to_thread.run_sync(lambda: open_backup(
        blob, circle_id=circle.circle_id, version=version, keys_for_epoch=keys_for_epoch,
        is_signer_allowed=lambda key: circle.state.is_member(key) or key in circle.state.removed))
    manifest = await read_manifest(source, circle.circle_id, backup.snapshot, keys_for_epoch, heads)
    return await read_indexes(source, circle.circle_id, manifest, keys_for_epoch, cache)


async def delete_blobs(client: RelayClient | RelaySession, ids: list[bytes]) -> set[bytes]:
    """The ids the relay confirmed deleted (or never had), in MAX_SEGMENT_IDS at a time;
    shielded, so a cancelled upload still deletes what it made obsolete."""
    deleted: set[bytes] = set()
    with trio.CancelScope(shield=True), trio.move_on_after(REQUEST_TIMEOUT_S):
        for start in range(0, len(ids), MAX_SEGMENT_IDS):
            try:
                await client.segment_delete(ids[start:start + MAX_SEGMENT_IDS])
            except RelayError as err:
                log.info("could not delete %d obsolete backup segments: %s", len(ids), err)
                break
            deleted.update(ids[start:start + MAX_SEGMENT_IDS])
    return deleted
