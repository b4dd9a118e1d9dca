"""Recovery's side of the incremental backup: each segment the manifest lists, in turn.

Memory stays bounded by one segment (at most 4 MiB) whatever the size of the log; ordering
the manifest's segments and opening and checking each one run in worker threads, and the
caller's ingest commits in one too (issue 20: nothing of the log's size on the trio thread). protocol/relay.md ("Incremental backup");
meshd/relay/recovery.py finds and opens the manifest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .backupblobs import fetch_blob, read_indexes
from .protocol.backupset import Manifest, SegmentRef, open_segment
from .protocol.circle import EpochKeys

if TYPE_CHECKING:
    from .relay.session import RelaySession


async def restore_logs(
    session: RelaySession, circle_id: bytes, manifest: Manifest,
    keys_for_epoch: Callable[[int], EpochKeys | None],
    ingest: Callable[[dict[str, Any]], Awaitable[int]],
) -> int:
    """Apply the manifest's inline batches (format 1), then fetch, verify and apply every
    segment it lists itself or through its indexes, one at a time, in seq order per author;
    the entries restored. ingest applies one log.entries batch (returning 0 to skip it), off
    the trio thread (meshd/relay/recovery.py's ingester)."""
    restored = 0
    manifest = await read_indexes(session, circle_id, manifest, keys_for_epoch)
    for batch in manifest.inline_logs:
        restored += await ingest(batch)
    for ref in await trio.to_thread.run_sync(_in_order, manifest):
        blob = await fetch_blob(session, ref.id, "segment")
        batches = await trio.to_thread.run_sync(partial(
            open_segment, blob, circle_id=circle_id, ref=ref, keys_for_epoch=keys_for_epoch))
        for batch in batches:
            restored += await ingest(batch)
    return restored


def _in_order(manifest: Manifest) -> list[SegmentRef]:
    """The segments in seq order per author (each author's log is applied from its start)."""
    return sorted(manifest.segments, key=lambda s: (s.author, s.first, s.last))
