"""This device's circle: loaded from and saved to the store, changed by merges (records from
peers and relays), by adoption (pairing, recovery) and by local operations, and every change
told to its subscribers.

Subscribers are called with the state before, the state after and where the change came
from, after the change's events are published and before it is saved: acting first (above
all, dropping a removed device) means a full disk never leaves a removed device connected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgpack

from .api.events import EventBus
from .identity import DeviceIdentity, fingerprint
from .protocol.circle import Circle, CircleState
from .protocol.crypto import RandomSource, short_key
from .protocol.records import ADD, DeviceInfo, Record
from .protocol.removal import may_author
from .store.db import Store, StoreError

log = logging.getLogger(__name__)

CIRCLE_STATE_KEY = "circle.records"

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
        """Records from a peer or the relay; raises RecordRejected for an invalid one."""
        before = self.circle.state
        if self.circle.merge(records):
            self.changed(before, source)

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

    def changed(self, before: CircleState, source: str) -> None:
        """The circle changed from `before` (a merge, an adoption, or a local operation on
        self.circle): publish what changed, tell the subscribers, save, rotate if needed."""
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
        self._store.set_state(CIRCLE_STATE_KEY, msgpack.packb(self.circle.records(), use_bin_type=True))

    def _save_or_log(self) -> None:
        try:
            self._save()
        except StoreError as err:
            # In memory the change holds; the records come back from peers or are saved with
            # the next change. Say so loudly: a restart before then forgets this change.
            log.error("could not save the circle's records: %s", err)
            self._count_error("store")
            self._events.publish("store.error", error=str(err))
