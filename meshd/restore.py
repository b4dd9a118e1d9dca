"""Recovery's side of the incremental backup: read the manifest, then each segment in turn.

Memory stays bounded by one segment (at most 4 MiB) whatever the size of the log; opening
and checking a segment runs in a worker thread. protocol/relay.md ("Incremental backup").
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .backup import REQUEST_TIMEOUT_S, BackupFailed
from .protocol.backupset import Manifest, open_segment
from .protocol.circle import Circle, epoch_keys
from .protocol.envelope import open_backup

if TYPE_CHECKING:
    from .relay.client import RelaySession


async def fetch_manifest(session: RelaySession, circle: Circle, readable: dict[int, bytes]
                         ) -> tuple[int | None, Manifest]:
    """The relay's backup manifest (recovery): its version (None if it has none) and content."""
    stored = await session.backup_get()
    if stored is None:
        return None, Manifest()
    backup = await trio.to_thread.run_sync(lambda: open_backup(
        stored.blob, circle_id=circle.circle_id, version=stored.version,
        keys_for_epoch=lambda n: epoch_keys(n, readable[n]) if n in readable else None,
        is_signer_allowed=lambda key: circle.state.is_member(key) or key in circle.state.removed))
    return stored.version, Manifest.from_snapshot(backup.snapshot)


async def restore_logs(
    session: RelaySession, circle: Circle, readable: dict[int, bytes], manifest: Manifest,
    ingest: Callable[[dict[str, Any]], int],
) -> int:
    """Fetch, verify and apply every segment, one at a time, in seq order per author; the
    entries restored. ingest applies one log.entries batch (raising to skip it)."""
    restored = 0
    for batch in manifest.inline_logs:
        restored += ingest(batch)
    for ref in sorted(manifest.segments, key=lambda s: (s.author, s.first, s.last)):
        with trio.fail_after(REQUEST_TIMEOUT_S):
            blob = await session.segment_get(ref.id)
        if blob is None:
            raise BackupFailed(f"the relay lost backup segment {ref.id.hex()}")
        batches = await trio.to_thread.run_sync(partial(
            open_segment, blob, circle_id=circle.circle_id, ref=ref,
            keys_for_epoch=lambda n: epoch_keys(n, readable[n]) if n in readable else None))
        for batch in batches:
            restored += ingest(batch)
    return restored
