"""Finding the blobs this device left at a relay that no ledger remembers, and deleting them.

The pending ledger (meshd/backupstate.py) records each blob before its upload, so those an
interrupted upload left are deleted by the next one. It cannot know of blobs uploaded by a
copy of the store it no longer has: a store restored from an older copy, or one lost with a
crash between an upload and the ledger's commit. So now and then (at the first upload after
a start, then every SWEEP_INTERVAL_S) the device pages through `relay.segment_list`, the ids
and sizes of the blobs its key stored at the relay, and deletes every one the relay's
current manifest (just fetched, rollback-checked, read whole) does not list.

The relay is not trusted: an id it lists that it does not hold costs a delete of nothing,
an id it leaves out stays (the quota shows it), and an id the manifest lists is never
deleted, whatever the relay says. Only this device's own blobs are listed (and those stored
before the relay recorded owners; never one stored with no owner since: relay/backend.py), so
another device's upload in flight (its blobs not yet listed by a manifest) is never touched. The
sizes listed, less those deleted, are what this device's blobs take of the circle's quota.

A device the circle removed uploads nothing more (the relay refuses it), so what it left
unlisted would stay until the relay's expiry. A relay that says `removed_segments` lists the
blobs a removed device's key stored to the remaining members (never an active member's: those
may be uploads in flight), and the sweep deletes those the current manifest does not list, under
the same rules: once for each device the circle removed since the last sweep at that relay, and
again with every periodic sweep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .backupblobs import delete_blobs
from .backupstate import REQUEST_TIMEOUT_S, RelayBackup, off_loop
from .protocol.backupplan import unlisted

if TYPE_CHECKING:
    from .protocol.backupset import Manifest
    from .relay.session import RelaySession

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 6 * 3600.0
# Pages of MAX_LISTED ids read per sweep at most: a relay that never ends its list (or a
# million leaked blobs) costs a bounded sweep; the next one goes on from the start again.
MAX_SWEEP_PAGES = 256
# And the longest a sweep takes: it runs inside an upload, and the backup loop uploads to its
# relays one after another (meshd/relay/backuploop.py), so a relay that answers each page and
# each delete just before REQUEST_TIMEOUT_S would otherwise hold every relay's backup for
# MAX_SWEEP_PAGES x 2 requests (over 4 h). What was deleted by then stays deleted.
MAX_SWEEP_S = 4 * REQUEST_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Swept:
    listed: int  # ids the relay listed as this device's
    deleted: int  # of those, the ones the manifest does not list, deleted
    stored_bytes: int  # what the listed ones not deleted take at the relay, as it says
    complete: bool  # the whole list was read (not cut at MAX_SWEEP_PAGES or MAX_SWEEP_S)


def sweep_due(state: RelayBackup, client: RelaySession, now: float,
              removed: frozenset[bytes] = frozenset()) -> bool:
    """Whether to sweep before this upload: the relay said it answers relay.segment_list (an
    older one would close the connection on the request), and the interval passed or it lists
    removed devices' blobs and the circle removed one (`removed`: X25519 keys) not swept there."""
    registration = client.registration
    if registration is None or not registration.segment_list:
        return False
    return now >= state.sweep_at or (registration.removed_segments
                                     and not removed <= state.removed_swept)


async def sweep_relay(address: str, state: RelayBackup, client: RelaySession, now: float,
                      removed: frozenset[bytes] = frozenset()) -> None:
    """Sweep against state.manifest (the caller just fetched it) and record the outcome; a
    failure fails the upload (loud, backed off) and waits for the next interval."""
    assert state.manifest is not None
    if now >= state.sweep_at:
        state.sweep_at = now + SWEEP_INTERVAL_S
        state.removed_swept = frozenset()  # each removed device's blobs again, too
        await _sweep_own(address, state, client, state.manifest)
    assert client.registration is not None
    if client.registration.removed_segments:
        for key in sorted(removed - state.removed_swept):
            # Once per key, complete or not: a relay listing without end costs one bounded
            # sweep per interval, not one per upload.
            state.removed_swept |= {key}
            swept = await sweep(client, state.manifest, key)
            state.swept += swept.deleted
            if swept.deleted:
                log.info("relay %s: deleted %d backup blobs a removed device left that no "
                         "manifest lists", address, swept.deleted)


async def _sweep_own(address: str, state: RelayBackup, client: RelaySession,
                     manifest: Manifest) -> None:
    swept = await sweep(client, manifest)
    state.stored_bytes = swept.stored_bytes if swept.complete else None
    state.swept += swept.deleted
    if swept.deleted:
        log.info("relay %s: deleted %d backup blobs no manifest lists and no ledger remembered",
                 address, swept.deleted)
    if not swept.complete:
        log.warning("relay %s: its list of this device's backup blobs was not read whole in %d "
                    "pages or %.0f s; the rest waits for the next sweep", address, MAX_SWEEP_PAGES,
                    MAX_SWEEP_S)


async def sweep(client: RelaySession, manifest: Manifest, device: bytes = b"") -> Swept:
    """Delete the blobs the relay lists as this device's (or as `device`'s, a removed
    device's X25519 key) that manifest (the relay's current one) does not list. RelayError
    and trio.TooSlowError as the requests raise them."""
    after, listed, deleted, stored = b"", 0, 0, 0
    with trio.move_on_after(MAX_SWEEP_S):  # (the deletes are shielded: each one finishes)
        for _ in range(MAX_SWEEP_PAGES):
            with trio.fail_after(REQUEST_TIMEOUT_S):
                items, more = await client.segment_list(after, device=device)
            if not items:
                return Swept(listed, deleted, stored, True)
            sizes = dict(items)
            leaked = await off_loop(unlisted, manifest, list(sizes))
            gone = await delete_blobs(client, leaked)
            listed += len(items)
            deleted += len(gone)
            stored += sum(sizes.values()) - sum(sizes[i] for i in gone)
            if not more:
                return Swept(listed, deleted, stored, True)
            after = items[-1][0]
    return Swept(listed, deleted, stored, False)
