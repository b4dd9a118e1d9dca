"""relay.segment_list: a device pages through the ids and sizes of the backup blobs its key
stored at the relay (protocol/relay.md), on SQLite and on PostgreSQL. Only its own (and
those stored before the relay recorded owners) are listed, in id order, paged; a page is
charged SEGMENT_LIST_COST requests to the key's rate bucket."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from meshd.protocol.relay import RATE_LIMITED, SEGMENT_LIST_COST, Limits, RelayError
from meshd.relay.storage import DATABASE_FILE, SQLiteRelayStorage

from .test_relay import (  # noqa: F401 - the hook and fixture run each test on both backends
    make_circle,
    pytest_generate_tests,
    relay_backend,
    running_relay,
    session,
)

SID = [bytes([n]) * 16 for n in range(8)]


async def test_a_device_lists_the_blobs_it_stored_in_pages(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice", "bob")
    async with running_relay(tmp_path / "relay") as relay, \
            session(relay, m["alice"], circle) as alice, session(relay, m["bob"], circle) as bob:
        assert alice.registration is not None and alice.registration.segment_list
        for n in (4, 0, 2, 1, 6):
            await alice.segment_put(SID[n], b"a" * (100 + n))
        await bob.segment_put(SID[3], b"b" * 50)
        pages = []
        after = b""
        while True:
            items, more = await alice.segment_list(after, limit=2)
            pages.append(items)
            if not more:
                break
            after = items[-1][0]
        assert pages == [[(SID[0], 100), (SID[1], 101)], [(SID[2], 102), (SID[4], 104)], [(SID[6], 106)]]
        assert await bob.segment_list() == ([(SID[3], 50)], False)  # only its own
        await alice.segment_delete([SID[0], SID[6]])
        assert await alice.segment_list() == ([(SID[1], 101), (SID[2], 102), (SID[4], 104)], False)
    async with running_relay(tmp_path / "relay") as relay, session(relay, m["bob"], circle) as bob:
        assert await bob.segment_list(SID[2]) == ([(SID[3], 50)], False)  # kept across a restart


async def test_a_page_of_the_list_costs_several_requests(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice")
    burst = SEGMENT_LIST_COST + 2
    async with running_relay(tmp_path / "relay", limits=Limits(rate_per_s=0.001, burst=burst)) as relay, \
            session(relay, m["alice"], circle) as alice:  # registering took one token
        assert await alice.segment_list() == ([], False)
        with pytest.raises(RelayError) as limited:
            await alice.segment_list()  # one token left, not SEGMENT_LIST_COST
        assert limited.value.code == RATE_LIMITED and not limited.value.fatal
        await alice.segment_get(SID[0])  # an ordinary request still fits


def test_blobs_stored_before_owners_were_kept_are_listed_to_every_member(tmp_path: Path) -> None:
    path = tmp_path / DATABASE_FILE
    old = sqlite3.connect(path)  # the schema before relay.segment_list
    old.executescript("CREATE TABLE segments (circle_id BLOB NOT NULL, id BLOB NOT NULL, "
                      "blob BLOB NOT NULL, PRIMARY KEY (circle_id, id));")
    old.execute("INSERT INTO segments VALUES (?, ?, ?)", (b"c" * 32, SID[1], b"x" * 30))
    old.commit()
    old.close()
    storage = SQLiteRelayStorage(path)
    try:
        storage.put_segment(b"c" * 32, SID[2], b"y" * 20, b"k" * 32)
        assert storage.segments_of(b"c" * 32, b"k" * 32, b"", 10) == [(SID[1], 30), (SID[2], 20)]
        assert storage.segments_of(b"c" * 32, b"o" * 32, b"", 10) == [(SID[1], 30)]
        assert storage.segments_of(b"d" * 32, b"k" * 32, b"", 10) == []  # another circle's
    finally:
        storage.close()


async def test_a_removed_devices_blobs_are_listed_to_the_members_left(tmp_path: Path) -> None:
    """A removed device uploads nothing more, so the blobs it left stayed until the relay's
    expiry: the members left may now list them (and delete those no manifest lists). Never
    an active member's: those may be an upload in flight."""
    circle, m, rng = make_circle("alice", "bob", "carol")
    carol_key = bytes(m["carol"].dh.public)
    bob_key = bytes(m["bob"].dh.public)
    async with running_relay(tmp_path / "relay") as relay:
        async with session(relay, m["carol"], circle) as carol, \
                session(relay, m["bob"], circle) as bob, session(relay, m["alice"], circle) as alice:
            assert alice.registration is not None and alice.registration.removed_segments
            await carol.segment_put(SID[1], b"c" * 70)
            await carol.segment_put(SID[2], b"c" * 80)
            await bob.segment_put(SID[3], b"b" * 50)
            assert await alice.segment_list(device=carol_key) == ([], False)  # carol is a member
            assert await alice.segment_list(device=bob_key) == ([], False)
            circle.remove_device(m["alice"].signer, m["carol"].sign_key, rng)
            await alice.register(circle.records())
            assert await alice.segment_list(device=carol_key) == ([(SID[1], 70), (SID[2], 80)], False)
            assert await alice.segment_list(SID[1], device=carol_key) == ([(SID[2], 80)], False)
            assert await alice.segment_list(device=bob_key) == ([], False)  # bob still is
            assert await alice.segment_list() == ([], False)  # alice's own: none
            await alice.segment_delete([SID[1]])
            assert await bob.segment_list(device=carol_key) == ([(SID[2], 80)], False)
