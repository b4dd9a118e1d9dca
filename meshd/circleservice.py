"""This device's circle: loaded from and saved to the store, changed by merges (records from
peers and relays), by adoption (pairing, recovery) and by local operations, and every change
told to its subscribers.

Subscribers are called with the state before, the state after and where the change came
from, after the change's events are published and before it is saved: acting first (above
all, dropping a removed device) means a full disk never leaves a removed device connected.

Merges stay off the event loop when they are large. A peer or a relay may send up to 4,096
records, and checking their signatures takes about 0.2 ms each: on the trio thread, one
such message would stall every connection and API request for most of a second. So a merge
bringing more than OFFLOOP_RECORDS new records is merged in a worker thread into a copy of
the circle, within MAX_MERGE_COST steps (the relay's bound), and the copy replaces the
circle back on the loop (if the circle changed meanwhile, the batch is merged again on top).
Merges queue (at most MAX_QUEUED_MERGES; more are dropped with a warning: the records come
again with the next heads exchange) and apply in order. A rejected off-loop batch is logged
and counted, not raised to its sender.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from functools import partial

import msgpack
import trio

from .api.events import EventBus
from .containment import report_bug
from .identity import DeviceIdentity, fingerprint
from .protocol.circle import Circle, CircleState
from .protocol.crypto import RandomSource, blake2b_256, short_key
from .protocol.records import ADD, DeviceInfo, Record, RecordRejected
from .protocol.removal import may_author
from .store.db import Store, StoreError

log = logging.getLogger(__name__)

CIRCLE_STATE_KEY = "circle.records"
# A merge with more new records than this is verified in a worker thread first (~6 ms of
# signatures on the loop at most).
OFFLOOP_RECORDS = 32
# Verification steps one merged batch may cost: the relay's MAX_OFFER_COST.
MAX_MERGE_COST = 400_000
MAX_QUEUED_MERGES = 4

Subscriber = Callable[[CircleState, CircleState, str], None]  # before, after, source


class CircleService:
    def __init__(self, store: Store, identity: DeviceIdentity, device: Callable[[], DeviceInfo],
                 rng: RandomSource, events: EventBus, count_error: Callable[[str], None]) -> None:
        self._store = store
        self._identity = identity
        self._rng = rng
        self._events = events
        self._count_error = count_error
        self._subscribers: list[Subscriber] = []
        self._generation = self._saved_generation = 0  # see _snapshot()
        self._queued: deque[tuple[list[bytes], str]] = deque()  # large merges, in order
        self._verifying = False  # the worker task runs
        self._settled: trio.Event | None = None  # set when the running worker ends
        self.merges_off_loop = 0  # applied after verification in a thread (tests, benches)
        saved = store.get_state(CIRCLE_STATE_KEY)
        if saved is not None:
            self.circle = Circle.from_records(msgpack.unpackb(saved))
        else:
            self.circle = Circle.create(identity.signing, device(), rng)
            self._save()
            log.info("created a new circle %s with this device as its only member",
                     short_key(self.circle.circle_id))

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    @property
    def is_member(self) -> bool:
        return self.circle.state.is_member(self._identity.signing.public)

    def may_author(self, sign_key: bytes) -> bool:
        return may_author(self.circle, sign_key)

    def merge(self, records: list[bytes], *, source: str) -> None:
        """Records from a peer or the relay. A small merge applies now and raises
        RecordRejected for an invalid record; a large one is queued for verification off
        the event loop (see the module docstring) and applies later."""
        if len(records) > OFFLOOP_RECORDS and _in_trio():
            # Hashing is cheap (~1 us a record); the signatures are what costs.
            new = sum(1 for r in records if type(r) is not bytes or not self.circle.has(blake2b_256(r)))
            if new > OFFLOOP_RECORDS:
                self._queue(records, source)
                return
        self._merge_now(records, source)

    def _merge_now(self, records: list[bytes], source: str) -> None:
        before = self.circle.state
        if self.circle.merge(records, max_cost=MAX_MERGE_COST):
            self.changed(before, source)

    def _queue(self, records: list[bytes], source: str) -> None:
        if len(self._queued) >= MAX_QUEUED_MERGES:
            log.warning("circle records from %s dropped: %d large merges already wait",
                        source, len(self._queued))
            self._count_error("circle")
            return
        self._queued.append((records, source))
        if not self._verifying:
            self._verifying = True
            self._settled = trio.Event()
            trio.lowlevel.spawn_system_task(self._verify_queued, name="meshd circle merges")

    async def wait_settled(self) -> None:
        """Until every queued merge is applied (or rejected) and saved."""
        if self._verifying and self._settled is not None:
            await self._settled.wait()

    async def _verify_queued(self) -> None:
        """The worker: merge each queued batch into a copy of the circle in a thread, then
        adopt the copy on the loop if the circle did not change meanwhile (else merge
        again). A system task (no nursery needed), so it never raises."""
        try:
            while self._queued:
                records, source = self._queued[0]
                heads = self.circle.heads
                try:
                    merged = await trio.to_thread.run_sync(
                        partial(_merged, self.circle.records(), records), abandon_on_cancel=True)
                except RecordRejected as err:
                    self._queued.popleft()
                    log.warning("circle records from %s do not verify: %s", source, err)
                    self._count_error("circle")
                    continue
                if self.circle.heads != heads:
                    continue  # a local change or a small merge came first: again, on top
                self._queued.popleft()
                if merged is not None:
                    before = self.circle.state
                    self.circle = merged
                    self.merges_off_loop += 1
                    self.changed(before, source, save=False)
                    # The records' fsync (tens of ms for thousands of records) in a thread too.
                    try:
                        await trio.to_thread.run_sync(self._write, *self._snapshot())
                    except StoreError as err:
                        self._save_or_log(err)
        except Exception as bug:  # noqa: BLE001 - contained: merges stop, the daemon goes on
            report_bug("circle merge", bug)
            self._queued.clear()
        finally:
            self._verifying = False
            if self._settled is not None:
                self._settled.set()

    def adopt(self, circle: Circle, source: str) -> None:
        before = self.circle.state
        self.circle = circle
        self.changed(before, source)

    def rotate_epoch(self, why: str) -> None:
        log.info("starting a new epoch: %s", why)
        before = self.circle.state
        self.circle.rotate_epoch(self._identity.signing, self._rng)
        self.changed(before, "this device")

    def discovery_keys(self) -> list[bytes]:
        """The current epoch's discovery key first, then the previous one (for late rotators)."""
        if not self.is_member:
            return []  # removed: it advertises nothing and recognises no one
        return [keys.discovery for keys in self.circle.recent_epochs(self._identity.noise, 2)]

    def changed(self, before: CircleState, source: str, *, save: bool = True) -> None:
        """The circle changed from `before` (a merge, an adoption, or a local operation on
        self.circle): publish what changed, tell the subscribers, save (unless the caller
        saves, off the loop), rotate if needed."""
        after = self.circle.state
        for key in after.members.keys() - before.members.keys():
            info = after.members[key]
            kind = "member.recovery_join" if self._is_recovery_join(key) else "member.added"
            if kind == "member.recovery_join":
                log.warning("RECOVERY: device %r (%s) joined the circle with the recovery key",
                            info.name, fingerprint(key))
            else:
                log.info("device %r (%s) added to the circle (via %s)", info.name, fingerprint(key), source)
            self._events.publish(kind, device=key.hex(), fingerprint=fingerprint(key), name=info.name)
        for key in after.removed - before.removed:
            log.warning("device %s removed from the circle (via %s)", fingerprint(key), source)
            self._events.publish("member.removed", device=key.hex(), fingerprint=fingerprint(key))
        if after.epoch_record != before.epoch_record:  # a record, not a number, names an epoch
            self._events.publish("epoch", number=after.epoch_number)
        for subscriber in self._subscribers:
            subscriber(before, after, source)
        if save:
            self._save_or_log()
        if after.needs_rotation and self.is_member:
            self.rotate_epoch("an epoch key was sealed to a removed device")

    def _is_recovery_join(self, key: bytes) -> bool:
        """Whether the record that added `key` was signed by a recovery member (loud event)."""
        members = self.circle.state.members
        for encoded in self.circle.records():
            record = Record.decode(encoded)
            if record.kind == ADD and record.device is not None and record.device.sign_key == key:
                author = members.get(record.author)
                return author is not None and author.recovery
        return False

    def _save(self) -> None:
        self._write(*self._snapshot())

    def _snapshot(self) -> tuple[int, bytes]:
        """The records to save, numbered: a save never overwrites a later one (the worker
        saves in a thread, and a small merge on the loop may save meanwhile)."""
        self._generation += 1
        return self._generation, msgpack.packb(self.circle.records(), use_bin_type=True)

    def _write(self, generation: int, encoded: bytes) -> None:
        with self._store.write_lock:
            if generation > self._saved_generation:
                self._store.set_state(CIRCLE_STATE_KEY, encoded)
                self._saved_generation = generation

    def _save_or_log(self, saved: StoreError | None = None) -> None:
        try:
            if saved is not None:
                raise saved
            self._save()
        except StoreError as err:
            # In memory the change holds; the records come back from peers or are saved with
            # the next change. Say so loudly: a restart before then forgets this change.
            log.error("could not save the circle's records: %s", err)
            self._count_error("store")
            self._events.publish("store.error", error=str(err))


def _merged(held: list[bytes], records: list[bytes]) -> Circle | None:
    """In a worker thread: a copy of the circle (from its records, known valid) with records
    merged in, or None when they add nothing. Raises RecordRejected."""
    copy = Circle.from_records(held)
    return copy if copy.merge(records, max_cost=MAX_MERGE_COST) else None


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False  # called from a tool or a test outside trio: merge inline
    return True
