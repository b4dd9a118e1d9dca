"""The incremental backup at each relay: upload what changed (meshd/restore.py reads it back).

meshd/protocol/backupset.py decides what to build (new entries, re-seals, compaction merges);
this module streams those entries from the store in bounded batches, seals segments in a
worker thread, uploads them, then stores the new manifest version by compare-and-swap and
deletes the segments it made obsolete. A conflict (another device stored a version) means:
read the relay's manifest, check it is not a rollback, and plan again from it.

Failures are loud: each relay's last outcome is in describe() (/v1/relays, /v1/status), in
meshd_backup_failures_total and meshd_backup_age_seconds, and a failing relay is retried
with exponential backoff whatever changes meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .backupblobs import delete_blobs, open_manifest
from .backupmanifest import CAS_ATTEMPTS, store_manifest
from .backupstate import (
    REQUEST_TIMEOUT_S,
    RETRY_MAX_S,
    RETRY_MIN_S,
    BackupFailed,
    BackupHost,
    BackupLedger,
    RelayBackup,
    check_purges,
    known_after_store,
    off_loop,
)
from .backupsweep import sweep_due, sweep_relay
from .protocol.backupplan import (
    Build,
    fold_and_plan,
    lag_marks,
    next_build,
    responsible_authors,
    settled,
    unlisted,
)
from .protocol.backupset import (
    BATCH_BYTES,
    SEGMENT_TARGET_BYTES,
    Manifest,
    SegmentRef,
    seal_index,
    seal_segment,
)
from .protocol.circle import EpochKeys
from .protocol.envelope import RollbackDetected, RollbackGuard
from .protocol.errors import ProtocolError
from .protocol.relay import SEGMENT_ID_BYTES, RelayError
from .protocol.removal import removed_dh_keys
from .quietlog import QuietLogger
from .store.db import StoreError

if TYPE_CHECKING:
    from .relay.client import RelayClient
    from .relay.session import RelaySession

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

# A round uploads at most this many segment bytes of new entries (or this many builds), then
# stores the manifest, so a large first backup is stored in steps that each survive alone.
ROUND_BYTES = 16 * 1024 * 1024
MAX_BUILDS_PER_UPLOAD = 256
# Another author's entries are this device's to upload once the relay's manifest has lagged
# behind them this long (their own device is away); before, each device uploads its own.
OTHERS_GRACE_S = 60.0


class Backups:
    def __init__(self, daemon: BackupHost, misbehaved: Callable[[str, str, str], None]) -> None:
        self._daemon = daemon
        self._misbehaved = misbehaved  # (relay, reason, detail): RelayHealth.misbehaved
        self.relays: dict[str, RelayBackup] = {}
        self._ledger = BackupLedger(daemon.store, SEGMENT_ID_BYTES)

    async def _set_pending(self, address: str, state: RelayBackup, ids: set[bytes]) -> None:
        """Record the ids still pending, in a worker thread (it fsyncs); shielded, so a
        cancelled upload still records what it deleted."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._ledger.save_pending, address, state, ids)

    def state(self, address: str) -> RelayBackup:
        state = self.relays.get(address)
        if state is None:
            state = self.relays[address] = self._ledger.load(address)
        return state

    async def _delete_leaked(self, address: str, state: RelayBackup, client: RelaySession,
                             guard: RollbackGuard) -> None:
        """Delete the segments an earlier round uploaded that the relay's current manifest does
        not list (a crash or a failed manifest store came between). The manifest is fetched
        anew: a store whose answer was lost may have listed them after all."""
        state.manifest = await self._fetch(state, client, guard)
        leaked = await off_loop(unlisted, state.manifest, frozenset(state.pending))
        deleted = await delete_blobs(client, leaked)
        if leaked:
            log.info("relay %s: deleted %d backup segments an interrupted upload left", address, len(deleted))
        await self._set_pending(address, state, set(leaked) - deleted)

    def _stored(self, address: str, state: RelayBackup, base: Manifest, stored: Manifest, uploaded: list[bytes],
                pending: frozenset[bytes], known: frozenset[bytes],
                ) -> tuple[list[bytes], list[bytes], frozenset[bytes]]:
        """A version was stored (worker thread): record it; the blobs base kept and this round
        uploaded that it does not list (to delete), the pending ids it does not list, and the
        segments known to the purge checks after it (known_after_store)."""
        self._ledger.save_version(address, state)
        return (unlisted(stored, base.blob_ids() | set(uploaded)), unlisted(stored, pending),
                known_after_store(stored, known, frozenset(uploaded)))

    def describe(self, address: str) -> dict[str, Any]:
        return self.state(address).describe()

    def forget(self, address: str) -> None:
        """The relay is a new incarnation (wiped or replaced): start again from version 0 and
        upload everything. An upload still running for the old incarnation writes nothing
        more (its session has ended, so its requests fail too)."""
        state = self.relays.pop(address, None)
        if state is not None:
            state.forgotten = True
        self._ledger.reset(address)

    def due(self, address: str) -> float:
        """Seconds until this relay may be tried again (0: now)."""
        return max(0.0, self.state(address).retry_at - time.monotonic())

    def update_age(self) -> None:
        """At a scrape of /metrics: each relay's backup age, and its stored bytes once known."""
        now, metrics = time.time(), self._daemon.metrics
        for address, state in self.relays.items():
            if state.at is not None:
                metrics.backup_age.set(now - state.at, relay=address)
            if state.stored_bytes is not None:
                metrics.backup_stored.set(state.stored_bytes, relay=address)

    # -- upload ------------------------------------------------------------------------------

    async def upload(self, address: str, client: RelayClient) -> bool:
        """Bring the relay's backup up to date; True on success. Never raises for the relay's
        or the network's failures: they are recorded, counted and backed off.

        The whole upload keeps to the session it began on: the state it starts from belongs
        to that session's incarnation of the relay, and a request sent on a later session
        may reach a wiped relay, whose version 0 is then no rollback."""
        daemon = self._daemon
        session = client.session
        if session is None:
            return False  # not connected: the next session wakes the backup loop
        state = self.state(address)
        try:
            version = await self._upload(address, state, session)
        except RollbackDetected as err:
            log.error("relay %s serves an older backup than one already seen: %s", address, err)
            self._misbehaved(address, "rollback", str(err))
            self._failed(address, state, f"rollback: {err}")
            return False
        except (RelayError, ProtocolError, StoreError, BackupFailed, trio.TooSlowError) as err:
            self._failed(address, state, str(err) or type(err).__name__)
            return False
        state.error, state.failures, state.retry_at, state.at = None, 0, 0.0, time.time()
        daemon.metrics.backup_age.set(0, relay=address)
        if version is not None:
            log.info("backup version %d stored at relay %s", version, address)
            daemon.events.publish("relay.backup", relay=address, version=version, entries=state.covers)
        return True

    def _failed(self, address: str, state: RelayBackup, error: str) -> None:
        state.error = error
        state.failures += 1
        delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (state.failures - 1))
        state.retry_at = time.monotonic() + delay
        self._daemon.metrics.backup_failures.inc(relay=address)
        quiet.warning(("backup", address, error), "relay %s: backup failed (%d in a row; next try in %.0f s): %s",
                      address, state.failures, delay, error)
        self._daemon.events.publish("relay.error", relay=address, error=f"backup: {error}")

    async def _fetch(self, state: RelayBackup, client: RelaySession, guard: RollbackGuard) -> Manifest:
        """The relay's current manifest (its version in state), not older than one seen."""
        with trio.fail_after(REQUEST_TIMEOUT_S):
            stored = await client.backup_get()
        guard.check(stored.version if stored else 0)
        manifest = (await open_manifest(self._daemon, client, stored.blob, stored.version, state.indexes,
                                        state.chains) if stored else Manifest())
        state.version = stored.version if stored else 0
        state.purge_read = True  # it may list segments another device sealed: check those once
        return manifest

    async def _authors(self, state: RelayBackup, client: RelaySession, guard: RollbackGuard,
                       epoch: int) -> set[bytes]:
        """Own entries at once; another author's once the manifest's coverage of them has not
        moved for OTHERS_GRACE_S while this device holds more (their device is away). Before
        taking another author over, the relay's current manifest is read: the cached one is
        this device's last version, and other devices store theirs in between."""
        daemon = self._daemon
        own = bytes(daemon.identity.signing.public)
        vector = daemon.logs.version_vector()

        async def update(manifest: Manifest) -> list[bytes]:
            marks = await off_loop(lag_marks, manifest, vector, epoch)
            now = time.monotonic()
            lag = {}
            for author, mark in marks.items():
                seen = state.lag.get(author)
                lag[author] = seen if seen is not None and seen[0] == mark else (mark, now)
            state.lag = lag
            return [a for a, (_, since) in lag.items() if a != own and now - since >= OTHERS_GRACE_S]

        assert state.manifest is not None
        if await update(state.manifest):
            state.manifest = await self._fetch(state, client, guard)
            await update(state.manifest)
        return responsible_authors(own, {a: since for a, (_, since) in state.lag.items()},
                                   time.monotonic(), OTHERS_GRACE_S, daemon.circle.state.removed)

    def wake_in(self, address: str) -> float | None:
        """When the backup loop should look at this relay again without a change: its backoff
        ending, or another author's lagging entries becoming this device's to upload. None
        if nothing is waiting or a wake is already set for then."""
        state = self.state(address)
        now = time.monotonic()
        own = bytes(self._daemon.identity.signing.public)
        waits = [since + OTHERS_GRACE_S - now for a, (_, since) in state.lag.items()
                 if a != own and since + OTHERS_GRACE_S > now]
        if state.retry_at > now:
            waits.append(state.retry_at - now)
        if not waits:
            return None
        at = now + min(waits)
        if now < state.wake_at <= at:
            return None
        state.wake_at = at
        return min(waits)

    async def _upload(self, address: str, state: RelayBackup, client: RelaySession) -> int | None:
        """Rounds of (segments, then the manifest by compare-and-swap) until the relay's backup
        covers what this device is responsible for; the last version stored, or None if it
        was already current."""
        daemon = self._daemon
        guard = RollbackGuard(state.version)
        stored_version: int | None = None
        conflicts = 0
        if state.pending:
            await self._delete_leaked(address, state, client, guard)
        removed = frozenset(removed_dh_keys(daemon.circle)) if daemon.circle.state.removed else frozenset()
        if sweep_due(state, client, time.monotonic(), removed):  # blobs no ledger remembers
            state.manifest = await self._fetch(state, client, guard)
            await sweep_relay(address, state, client, time.monotonic(), removed)
        vector = daemon.logs.version_vector()  # the log as the upload began: see _build
        state.covers = sum(vector.values())
        while True:
            if state.manifest is None:
                state.manifest = await self._fetch(state, client, guard)
            keys = self._keys()
            records = daemon.circle.records()
            authors = await self._authors(state, client, guard, keys.number)
            base = state.manifest
            built, uploaded, complete = await self._build(address, base, keys, client, state, authors, vector)
            settling = await off_loop(settled, base, built, records, uploaded)
            if settling is None:
                return stored_version  # the relay's backup is current
            manifest = await self._index(address, state, client, keys, settling, uploaded)
            stored = await store_manifest(
                daemon, state, client, keys, base, manifest, authors,
                fetch=partial(self._fetch, state, client, guard), put=partial(self._put, address, state, client),
                drop=partial(self._drop, address, state, client))
            if stored is None:  # another device changed the same authors: plan again from theirs
                await self._set_pending(address, state, state.pending - await delete_blobs(client, uploaded))
                conflicts += 1
                if conflicts >= CAS_ATTEMPTS:
                    raise BackupFailed("the backup kept changing at the relay (compare-and-swap conflicts)")
                continue
            base, manifest = stored
            state.manifest = manifest
            stored_version = state.version
            with trio.CancelScope(shield=True):  # stored: record it and delete what it replaced
                obsolete, still, state.purge_known = await off_loop(
                    self._stored, address, state, base, manifest, uploaded, frozenset(state.pending),
                    state.purge_known)
                deleted = await delete_blobs(client, obsolete)
                await self._set_pending(address, state, set(still) - deleted)
            if complete:
                return stored_version

    async def _build(
        self, address: str, manifest: Manifest, keys: EpochKeys, client: RelaySession, state: RelayBackup,
        authors: set[bytes], vector: dict[bytes, int],
    ) -> tuple[Manifest, list[bytes], bool]:
        """Upload the segments next_build() asks for the log as of `vector`, at most
        ROUND_BYTES of them; the new manifest, the ids uploaded, and whether nothing is left
        to build. Entries written meanwhile wait for the next upload: chasing them made a
        segment (and a round trip) per entry, merged twice more later (issue 20)."""
        uploaded: list[bytes] = []
        budget = [ROUND_BYTES]
        bodies_now = await check_purges(self._daemon.store, manifest, state, authors)
        build = await off_loop(next_build, manifest, vector, keys.number, bodies_now, authors)
        for _ in range(MAX_BUILDS_PER_UPLOAD):
            if budget[0] <= 0:
                return manifest, uploaded, False
            if build is None:
                return manifest, uploaded, True
            try:
                refs = await self._build_one(address, build, keys, client, state, budget)
            except BaseException:
                await self._set_pending(address, state, state.pending - await delete_blobs(client, uploaded))
                raise
            uploaded.extend(ref.id for ref in refs)
            # One trip to the worker thread per build: fold it in, plan the next.
            manifest, build = await off_loop(fold_and_plan, manifest, refs, build, vector, keys.number,
                                             bodies_now, authors)
        return manifest, uploaded, False

    async def _build_one(
        self, address: str, build: Build, keys: EpochKeys, client: RelaySession, state: RelayBackup,
        budget: list[int],
    ) -> list[SegmentRef]:
        """Stream build's entries from the store in bounded batches (yielding between them),
        seal each segment in a worker thread, upload it. New entries stop early once the
        round's budget is spent (the next round goes on from there); a merge or re-seal,
        which replaces segments, is built entire."""
        daemon = self._daemon
        refs: list[SegmentRef] = []
        after = build.after
        while after < build.through and (build.replaces or budget[0] > 0):
            batches: list[dict[str, Any]] = []
            size = 0
            while (build.whole or size < SEGMENT_TARGET_BYTES) and after < build.through:
                batch = daemon.logs.batch_since(build.author, after, BATCH_BYTES)
                if batch is None:
                    break
                batches.append(batch)
                size += sum(map(len, batch["headers"])) + sum(len(b) for b in batch["bodies"] if b)
                after = batch["head"]["seq"]
                await trio.lowlevel.checkpoint()
            if not batches:
                raise BackupFailed("the store no longer holds entries the backup needs")
            segment_id = daemon.rng(SEGMENT_ID_BYTES)
            blob, ref = await trio.to_thread.run_sync(partial(
                seal_segment, keys=keys, circle_id=daemon.circle.circle_id, segment_id=segment_id,
                author=build.author, batches=batches, rng=daemon.rng))
            del batches
            try:
                await self._put(address, state, client, segment_id, blob)
            except BaseException:
                ids = [segment_id, *(r.id for r in refs)]
                await self._set_pending(address, state, state.pending - await delete_blobs(client, ids))
                raise
            budget[0] -= len(blob)
            refs.append(ref)
        return refs

    async def _drop(self, address: str, state: RelayBackup, client: RelaySession, ids: list[bytes]) -> None:
        await self._set_pending(address, state, state.pending - await delete_blobs(client, ids))

    async def _put(self, address: str, state: RelayBackup, client: RelaySession, blob_id: bytes,
                   blob: bytes) -> None:
        """Upload a segment or index blob, its id recorded as pending first (off the trio
        thread: it fsyncs)."""
        if state.forgotten:
            raise BackupFailed("the relay changed incarnation during the upload")
        await trio.to_thread.run_sync(self._ledger.save_pending, address, state, state.pending | {blob_id})
        with trio.fail_after(REQUEST_TIMEOUT_S):
            await client.segment_put(blob_id, blob)
        state.uploaded_bytes += len(blob)
        self._daemon.metrics.backup_bytes.inc(len(blob))

    async def _index(self, address: str, state: RelayBackup, client: RelaySession, keys: EpochKeys,
                     manifest: Manifest, uploaded: list[bytes]) -> Manifest:
        """List the full segments no index lists yet in new index blobs, INDEX_REFS at a time,
        so the manifest stored at each upload stays small (one reference per 64 full ones)."""
        while (refs := await off_loop(manifest.to_index)) is not None:
            index_id = self._daemon.rng(SEGMENT_ID_BYTES)
            blob, index = await trio.to_thread.run_sync(partial(
                seal_index, keys=keys, circle_id=self._daemon.circle.circle_id, index_id=index_id,
                refs=refs, rng=self._daemon.rng))
            await self._put(address, state, client, index_id, blob)  # pending: a failure leaks nothing
            uploaded.append(index_id)
            state.indexes[index_id] = refs
            manifest = await off_loop(manifest.with_index, index, refs)
        return manifest

    def _keys(self) -> EpochKeys:
        daemon = self._daemon
        return daemon.circle.current_keys(daemon.identity.noise)
