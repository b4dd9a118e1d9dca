"""Recovery's side of the incremental backup: each segment the manifest lists, in turn.

Memory stays bounded by one segment (at most 4 MiB) whatever the size of the log; opening
and checking a segment runs in a worker thread. protocol/relay.md ("Incremental backup");
meshd/relay/recovery.py finds and opens the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .backupblobs import fetch_blob, read_indexes
from .protocol.backupset import Manifest, open_segment
from .protocol.circle import EpochKeys

if TYPE_CHECKING:
    from .relay.session import RelaySession


async def restore_logs(
    session: RelaySession, circle_id: bytes, manifest: Manifest,
    keys_for_epoch: Callable[[int], EpochKeys | None], ingest: Callable[[dict[str, Any]], int],
) -> int:
    """Apply the manifest's inline batches (format 1), then fetch, verify and apply every
    segment it lists itself or through its indexes, one at a time, in seq order per author;
    the entries restored. ingest applies
    one log.entries batch (raising to skip it)."""
    restored = 0
    manifest = await read_indexes(session, circle_id, manifest, keys_for_epoch)
    for batch in manifest.inline_logs:
        restored += ingest(batch)
    for ref in sorted(manifest.segments, key=lambda s: (s.author, s.first, s.last)):
        blob = await fetch_blob(session, ref.id, "segment")
        batches = await trio.to_thread.run_sync(partial(
            open_segment, blob, circle_id=circle_id, ref=ref, keys_for_epoch=keys_for_epoch))
        for batch in batches:
            restored += ingest(batch)
    return restored
