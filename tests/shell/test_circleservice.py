"""The circle service on its own: a real store and identity, no daemon (meshd/circleservice.py)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from meshd.api.events import EventBus
from meshd.circleservice import CircleService
from meshd.identity import load_or_create_identity
from meshd.protocol.circle import Circle, CircleState
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair
from meshd.protocol.records import DeviceInfo
from meshd.store.db import Store


class RecordingBus(EventBus):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def publish(self, type: str, **data: Any) -> None:
        self.seen.append((type, data))
        super().publish(type, **data)


def service(state_dir: Path, bus: EventBus, rng: Any) -> tuple[CircleService, Store]:
    identity = load_or_create_identity(state_dir, rng)
    store = Store(state_dir / "meshd.db")
    me = DeviceInfo(identity.signing.public, identity.noise.public, "laptop").claimed(identity.signing)
    errors: list[str] = []
    return CircleService(store, identity, lambda: me, rng, bus, errors.append), store


def other_device(rng: Any, name: str) -> tuple[SigningKeyPair, DeviceInfo]:
    signer = SigningKeyPair(rng(32))
    return signer, DeviceInfo(signer.public, DHKeyPair.generate(rng).public, name).claimed(signer)


def test_a_new_service_founds_a_circle_and_a_restart_loads_the_same(tmp_path: Path) -> None:
    rng = random.Random(1).randbytes
    first, store = service(tmp_path, RecordingBus(), rng)
    assert first.is_member and first.discovery_keys()
    store.close()
    again, _ = service(tmp_path, RecordingBus(), rng)
    assert again.circle.circle_id == first.circle.circle_id


def test_a_merge_tells_subscribers_publishes_and_saves(tmp_path: Path) -> None:
    rng = random.Random(2).randbytes
    bus = RecordingBus()
    circles, store = service(tmp_path, bus, rng)
    calls: list[tuple[CircleState, CircleState, str]] = []
    circles.subscribe(lambda before, after, source: calls.append((before, after, source)))
    # Another member's copy adds a phone; its records arrive as from a peer.
    copy = Circle.from_records(circles.circle.records())
    identity = load_or_create_identity(tmp_path)
    _, phone = other_device(rng, "phone")
    copy.add_device(identity.signing, phone, rng)
    circles.merge(copy.records(), source="peer")
    assert len(calls) == 1
    before, after, source = calls[0]
    assert source == "peer" and phone.sign_key not in before.members and phone.sign_key in after.members
    assert any(kind == "member.added" and data["device"] == phone.sign_key.hex()
               for kind, data in bus.seen)
    circles.merge(copy.records(), source="peer")  # nothing new: nobody is told
    assert len(calls) == 1
    store.close()
    reloaded, _ = service(tmp_path, RecordingBus(), rng)
    assert phone.sign_key in reloaded.circle.state.members


def test_removing_this_device_is_seen_by_subscribers_and_it_stops_advertising(tmp_path: Path) -> None:
    rng = random.Random(3).randbytes
    circles, _ = service(tmp_path, RecordingBus(), rng)
    identity = load_or_create_identity(tmp_path)
    desktop_signer, desktop = other_device(rng, "desktop")
    before = circles.circle.state
    circles.circle.add_device(identity.signing, desktop, rng)
    circles.changed(before, "this device")
    # The desktop removes the laptop (this device), in its own copy; the records arrive.
    theirs = Circle.from_records(circles.circle.records())
    theirs.remove_device(desktop_signer, identity.signing.public, rng, force=True)
    seen: list[bool] = []
    circles.subscribe(lambda b, a, s: seen.append(a.is_member(identity.signing.public)))
    circles.merge(theirs.records(), source="peer")
    assert seen and seen[0] is False
    assert not circles.is_member and circles.discovery_keys() == []


async def test_a_large_merge_is_verified_off_the_event_loop(tmp_path: Path) -> None:
    """More than OFFLOOP_RECORDS new records: merge() returns at once, the signatures are
    checked in a worker thread, and the subscribers hear of the change afterwards (on the
    old code the whole merge ran inline, on the trio thread)."""
    import trio

    from meshd.circleservice import OFFLOOP_RECORDS

    rng = random.Random(7).randbytes
    circles, store = service(tmp_path, RecordingBus(), rng)
    identity = load_or_create_identity(tmp_path)
    copy = Circle.from_records(circles.circle.records())
    added = []
    for index in range(OFFLOOP_RECORDS + 8):
        _, device = other_device(rng, f"device-{index}")
        copy.add_device(identity.signing, device, rng)
        added.append(device.sign_key)
    merged = trio.Event()
    circles.subscribe(lambda before, after, source: merged.set())
    circles.merge(copy.records(), source="peer")
    assert not any(key in circles.circle.state.members for key in added)  # not inline
    with trio.fail_after(60):  # a hang guard
        await merged.wait()
    assert all(key in circles.circle.state.members for key in added)
    assert circles.merges_off_loop == 1
    with trio.fail_after(60):  # a hang guard
        await circles.wait_settled()  # saved, in a thread
    store.close()
    reloaded, _ = service(tmp_path, RecordingBus(), rng)
    assert all(key in reloaded.circle.state.members for key in added)


async def test_a_large_merge_that_does_not_verify_changes_nothing_and_is_counted(tmp_path: Path) -> None:
    import trio

    from meshd.circleservice import OFFLOOP_RECORDS

    rng = random.Random(8).randbytes
    identity = load_or_create_identity(tmp_path, rng)
    store = Store(tmp_path / "meshd.db")
    me = DeviceInfo(identity.signing.public, identity.noise.public, "laptop").claimed(identity.signing)
    counted = trio.Event()
    errors: list[str] = []

    def count_error(kind: str) -> None:
        errors.append(kind)
        counted.set()

    circles = CircleService(store, identity, lambda: me, rng, RecordingBus(), count_error)
    copy = Circle.from_records(circles.circle.records())
    for index in range(OFFLOOP_RECORDS + 8):
        _, device = other_device(rng, f"device-{index}")
        copy.add_device(identity.signing, device, rng)
    records = copy.records()
    forged = bytearray(records[-1])
    forged[-1] ^= 1  # the last record's signature no longer verifies
    before = circles.circle.heads
    circles.merge([*records[:-1], bytes(forged)], source="peer")
    with trio.fail_after(60):  # a hang guard
        await counted.wait()
    await circles.wait_settled()
    assert errors == ["circle"]
    assert circles.circle.heads == before
    assert circles.merges_off_loop == 0
    store.close()
