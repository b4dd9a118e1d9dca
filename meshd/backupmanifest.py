"""Storing a backup's manifest as the next version: inline, or as a chain of sealed blobs.

meshd/backup.py builds and uploads the segments; this module stores the manifest that lists
them by compare-and-swap. A small manifest goes inline in the signed backup blob (format 2
or 3). A larger one (format 4, meshd/protocol/backupchain.py) is stored as a delta against
the version it replaces, chained on that version's blobs, and the signed blob names only the
chain's base and head; a new base once the deltas together pass twice the base's size, the chain
reaches CHAIN_MAX, the base is of an older epoch, or the version replaced was inline. So an
upload that adds one segment stores about 0.45 KB of manifest whatever the size of the log.
On a conflict the manifest is rebased onto the version another device stored (backupplan.py)
and its delta computed again against that one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .backupblobs import remember_head
from .backupstate import REQUEST_TIMEOUT_S, BackupHost, RelayBackup, off_loop
from .protocol.backupchain import INLINE_MAX, diff, seal_base, seal_delta
from .protocol.backupplan import rebase
from .protocol.backupset import Chain, Manifest
from .protocol.circle import EpochKeys
from .protocol.envelope import _pack, seal_backup
from .protocol.relay import CONFLICT, MAX_SEGMENT_BYTES, SEGMENT_ID_BYTES, RelayError

if TYPE_CHECKING:
    from .protocol.crypto import RandomSource
    from .relay.session import RelaySession

CAS_ATTEMPTS = 3  # conflicts in a row before giving up until the next try
# The bytes a sealed delta or base adds to its packed content (envelope header, tag, "prev").
SEAL_OVERHEAD = 128


async def store_manifest(
    daemon: BackupHost, state: RelayBackup, client: RelaySession, keys: EpochKeys,
    base: Manifest, manifest: Manifest, authors: set[bytes], *,
    fetch: Callable[[], Awaitable[Manifest]],
    put: Callable[[bytes, bytes], Awaitable[None]],
    drop: Callable[[list[bytes]], Awaitable[None]],
) -> tuple[Manifest, Manifest] | None:
    """Store manifest as the next version by compare-and-swap. After a conflict, rebase it
    onto the version the other device stored and try again (its segments stay valid: each
    device builds other authors' segments only while they lag). Returns the base it was
    stored on and what was stored (its chain set), or None (state.manifest is then the
    relay's, or None after CAS_ATTEMPTS conflicts). fetch reads the relay's manifest (the
    rollback check included); put uploads a chain blob as pending; drop deletes blobs."""
    circle_id = daemon.circle.circle_id
    for _ in range(CAS_ATTEMPTS):
        # The snapshots, their diff and the seal are O(manifest): off the trio thread.
        chain, blob_id, blob, snapshot, full = await trio.to_thread.run_sync(partial(
            _prepare, keys, circle_id, base, manifest, daemon.rng(SEGMENT_ID_BYTES), daemon.rng))
        put_ids: list[bytes] = []
        if blob is not None:
            await put(blob_id, blob)
            put_ids.append(blob_id)
        signed = await trio.to_thread.run_sync(partial(
            seal_backup, keys=keys, circle_id=circle_id, signer=daemon.identity.signing,
            version=state.version + 1, snapshot=snapshot, rng=daemon.rng))
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await client.backup_put(state.version, state.version + 1, signed)
        except RelayError as err:
            if err.code != CONFLICT:
                raise
            await drop(put_ids)
            theirs = await fetch()
            rebased = await off_loop(rebase, base, theirs, manifest, authors)
            if rebased is None:
                state.manifest = theirs
                return None
            base, manifest = theirs, rebased
            continue
        state.uploaded_bytes += len(signed)
        state.manifest_bytes = len(signed) + (len(blob) if blob is not None else 0)
        state.version += 1
        if chain is not None:  # a read that meets this head fetches nothing older (issue 20)
            remember_head(state.chains, full, chain)
        return base, replace(manifest, chain=chain)
    state.manifest = None
    return None


def _prepare(keys: EpochKeys, circle_id: bytes, base: Manifest, manifest: Manifest, blob_id: bytes,
             rng: RandomSource) -> tuple[Chain | None, bytes, bytes | None, dict[str, Any], dict[str, Any]]:
    """What stores manifest after base: (its chain, the id and sealed blob to upload first, the
    snapshot to sign, the full snapshot), inline (no chain, no blob) when small or too large
    for a blob, else a delta on base's chain or a new base."""
    full = manifest.snapshot()
    if not INLINE_MAX < len(_pack(full)) <= MAX_SEGMENT_BYTES - SEAL_OVERHEAD:
        return None, blob_id, None, full, full
    old = base.chain
    if old is not None and old.base.epoch == keys.number:
        delta = diff(base.snapshot(), full)
        if old.can_extend(len(_pack(delta)) + SEAL_OVERHEAD):
            prev = old.deltas[-1] if old.deltas else old.base
            blob, ref = seal_delta(keys=keys, circle_id=circle_id, blob_id=blob_id, prev=prev, delta=delta, rng=rng)
            chain = Chain(old.base, old.deltas + (ref,))
            return chain, blob_id, blob, chain.signed(), full
    blob, ref = seal_base(keys=keys, circle_id=circle_id, blob_id=blob_id, snapshot=full, rng=rng)
    chain = Chain(ref)
    return chain, blob_id, blob, chain.signed(), full
