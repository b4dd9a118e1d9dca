"""What a device knows of each relay's backup, and what the backup needs of the daemon.

meshd/backup.py uploads; this module holds its per-relay state (version, manifest, last
outcome, backoff, the authors whose entries lag at the relay, the cycle of purge checks:
check_purges), the host interface the daemon implements, and the failure type restore and
recovery share.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

if TYPE_CHECKING:
    from .api.events import EventBus
    from .api.metrics import MeshdMetrics
    from .identity import DeviceIdentity
    from .net.logsync import LogService
    from .protocol.backupset import BlobRef, Chain, Manifest, SegmentRef
    from .protocol.circle import Circle
    from .protocol.crypto import RandomSource
    from .store.db import Store

VERSION_KEY = "relay.backup-version.{}"
# Segment ids uploaded but not yet listed by a stored manifest (or deleted), concatenated:
# written before each upload, so a crash or a failed manifest leaves no segment untracked.
PENDING_KEY = "relay.backup-pending.{}"
REQUEST_TIMEOUT_S = 30.0
RETRY_MIN_S = 2.0
RETRY_MAX_S = 300.0
PURGE_CHECKS = 64  # segments whose bodies are counted per upload during a cycle of checks

T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a worker thread: every walk of a manifest (planning, diffing, listing ids,
    indexing, reading one back) is proportional to the backup's size, and the trio thread
    runs nothing of that size (issue 20). fn must not touch state the trio thread changes."""
    return await trio.to_thread.run_sync(partial(fn, *args))


class BackupHost(Protocol):
    """What backups need of the daemon (this module never imports it)."""

    @property
    def circle(self) -> Circle: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def identity(self) -> DeviceIdentity: ...
    @property
    def logs(self) -> LogService: ...
    @property
    def metrics(self) -> MeshdMetrics: ...
    @property
    def rng(self) -> RandomSource: ...
    @property
    def store(self) -> Store: ...


class BackupFailed(Exception):
    """An upload that did not complete (the message says why; never key material)."""


@dataclass(slots=True)
class RelayBackup:
    """One relay's backup as this device knows it."""

    version: int = 0
    manifest: Manifest | None = None  # of `version`, when known
    at: float | None = None  # wall-clock time of the last success
    error: str | None = None
    failures: int = 0  # consecutive
    retry_at: float = 0.0  # monotonic
    uploaded_bytes: int = 0
    manifest_bytes: int = 0  # the last manifest this device stored there (the backup window's size)
    covers: int = 0  # entries in the log as the last upload began: what it backed up
    # Purge checks (check_purges): the store's count of purging commits and the authors
    # when the current cycle of checks began (None: none yet), the segments of that cycle,
    # and the index of the next one to check (len: the cycle is over). purge_read: a
    # manifest was read from the relay since the cycle began (it may list segments another
    # device sealed); purge_known: the ids of the segments this device sealed or put in a
    # cycle, of those its manifest lists (pruned at each store and each cycle).
    purge_mark: tuple[int, frozenset[bytes]] | None = None
    purge_cycle: tuple[SegmentRef, ...] = ()
    purge_next: int = 0
    purge_read: bool = False
    purge_known: frozenset[bytes] = frozenset()
    # author -> ((coverage, old-epoch segments) in the manifest, monotonic time it was first seen)
    lag: dict[bytes, tuple[tuple[int, int], float]] = field(default_factory=dict)
    wake_at: float = 0.0  # monotonic: the backup loop is already set to run then
    # Segments uploaded and not yet known to be listed by a stored manifest or deleted; kept
    # in the store (PENDING_KEY) so those a crash or failed round left are deleted.
    pending: set[bytes] = field(default_factory=set)
    # The references each index of the manifest lists (meshd/backupindex.py): read once.
    indexes: dict[bytes, list[SegmentRef]] = field(default_factory=dict)
    # Chain heads this device stored or read -> (the full snapshot there, the chain): a read
    # stops walking back at one (meshd/backupblobs.py read_manifest), so a conflict fetches
    # only the blobs stored since. At most CHAIN_HEADS_KEPT, the newest.
    chains: dict[BlobRef, tuple[dict[str, Any], Chain]] = field(default_factory=dict)
    # The sweep (meshd/backupsweep.py): when next (monotonic), the blobs it deleted in all,
    # and the bytes this device's blobs take at the relay as of the last complete one.
    sweep_at: float = 0.0
    swept: int = 0
    removed_swept: frozenset[bytes] = frozenset()  # removed devices' keys swept since sweep_at was set
    stored_bytes: int | None = None
    # The relay turned out to be a new incarnation: this state was of the old one (Backups.forget).
    forgotten: bool = False

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "at": self.at, "error": self.error,
                "failures": self.failures, "uploaded_bytes": self.uploaded_bytes,
                "stored_bytes": self.stored_bytes, "swept": self.swept,
                "retry_in": round(max(0.0, self.retry_at - time.monotonic()), 1)}


class BackupLedger:
    """The part of each relay's backup state kept in the store across restarts: the last
    version this device stored or saw there, and the segment ids not yet known to be listed."""

    def __init__(self, store: Store, id_bytes: int) -> None:
        self._store = store
        self._id_bytes = id_bytes

    def load(self, address: str) -> RelayBackup:
        raw = self._store.get_state(VERSION_KEY.format(address))
        ids = self._store.get_state(PENDING_KEY.format(address)) or b""
        step = self._id_bytes
        return RelayBackup(version=int(raw.decode()) if raw else 0,
                           pending={ids[i:i + step] for i in range(0, len(ids), step)})

    # save_version and save_pending run in worker threads (meshd/backup.py): each checks
    # `forgotten` and writes under the store's write lock, which reset() takes only after
    # Backups.forget() marked the state forgotten, so an upload of a relay's old incarnation
    # never writes over the reset (it writes before it, or sees `forgotten` and writes nothing).

    def save_version(self, address: str, state: RelayBackup) -> None:
        with self._store.write_lock:
            if not state.forgotten:
                self._store.set_state(VERSION_KEY.format(address), str(state.version).encode())

    def save_pending(self, address: str, state: RelayBackup, ids: set[bytes]) -> None:
        with self._store.write_lock:
            if ids != state.pending and not state.forgotten:
                self._store.set_state(PENDING_KEY.format(address), b"".join(sorted(ids)))
                state.pending = ids

    def reset(self, address: str) -> None:
        self._store.set_state(VERSION_KEY.format(address), b"0")
        self._store.set_state(PENDING_KEY.format(address), b"")


async def check_purges(store: Store, manifest: Manifest, state: RelayBackup,
                       authors: Collection[bytes]) -> dict[bytes, int]:
    """Bodies the store still has for up to PURGE_CHECKS segments of `authors` (the only ones
    next_build re-seals), only for segments a purge may have left with bodies the store no
    longer has. A COUNT over a segment's range reads all its pages (about 1 MiB for a full
    one), so counting at every upload cost in proportion to the log (issue 20). A cycle of
    checks begins once the store's count of purging commits (Store.purges) or `authors`
    changed since the last cycle began, or a manifest was read from the relay since, and goes
    on PURGE_CHECKS per upload until each of its segments was checked. It covers the listed
    segments of `authors` that overlap what the commits since the last cycle began purged
    (Store.purged_since), so one delete checks one segment at any log size, and those this
    device neither sealed nor put in a cycle before (purge_known): a read manifest may list
    segments another device sealed from its store, each checked once. Every listed segment
    of `authors` when the store's journal no longer says, when `authors` changed, and in the
    first cycle. A read used to start a cycle over every segment (two devices storing in
    turn read at nearly every upload: a cost that grew with the log, issue 20). A segment
    sealed later read the store after the cycle began, so a purge it missed is in the next
    cycle's runs."""
    if state.purge_next >= len(state.purge_cycle):
        last = state.purge_mark
        count, runs = store.purged_since(last[0] if last else 0)
        mark = (count, frozenset(authors))
        if mark == last and not state.purge_read:
            return {}  # nothing purged or read since every segment of the last cycle was checked
        if last is None or last[1] != mark[1]:
            runs = None
        state.purge_mark, state.purge_next, state.purge_read = mark, 0, False
        state.purge_cycle, state.purge_known = await off_loop(
            _segments_of, manifest, mark[1], runs, state.purge_known)
    out: dict[bytes, int] = {}
    end = min(len(state.purge_cycle), state.purge_next + PURGE_CHECKS)
    for segment in state.purge_cycle[state.purge_next:end]:
        out[segment.id] = store.body_count(segment.author, segment.first, segment.last)
        await trio.lowlevel.checkpoint()
    state.purge_next = end
    return out


def known_after_store(stored: Manifest, known: frozenset[bytes], uploaded: Collection[bytes]) -> frozenset[bytes]:
    """purge_known once `stored` was stored: the segments this device sealed for it (its
    bodies counts read this store) join; those it no longer lists leave (so the set stays
    bounded by the manifest)."""
    return frozenset(s.id for s in stored.segments if s.id in known or s.id in uploaded)


def _segments_of(manifest: Manifest, authors: frozenset[bytes], runs: list[tuple[bytes, int, int]] | None,
                 known: frozenset[bytes]) -> tuple[tuple[SegmentRef, ...], frozenset[bytes]]:
    """The listed segments of `authors` not in `known` or, with `runs` ((author, first, last)
    purged), overlapping one (each run's overlap found by bisection over the author's runs),
    every one without; and the ids of the listed segments of `authors` (all known once the
    cycle is over)."""
    mine = [s for s in manifest.segments if s.author in authors]
    ids = frozenset(s.id for s in mine)
    if runs is None:
        return tuple(mine), ids
    starts: dict[bytes, list[int]] = {}
    ends: dict[bytes, list[int]] = {}
    for author, first, last in sorted(runs):
        if author in authors:
            starts.setdefault(author, []).append(first)
            ends.setdefault(author, []).append(last)
    for author, author_ends in ends.items():  # sorted by first: make ends a running maximum
        ends[author] = list(accumulate(author_ends, max))
    out = []
    for segment in mine:
        if segment.id not in known:
            out.append(segment)
            continue
        author_starts = starts.get(segment.author)
        if author_starts is None:
            continue
        # The runs that begin at or before the segment's last seq; one of them reaches its first.
        i = bisect_right(author_starts, segment.last)
        if i and ends[segment.author][i - 1] >= segment.first:
            out.append(segment)
    return tuple(out), ids
