"""The relay's backup segments (relay.segment_put/get/delete) with a real relay and sessions:
immutable ids, the circle's quota, deletion freeing space, and persistence across a restart.
Each runs on SQLite and on PostgreSQL, as the tests of test_relay.py do."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.protocol.relay import (
    CONFLICT,
    MAX_SEGMENT_BYTES,
    QUOTA_EXCEEDED,
    TOO_LARGE,
    Limits,
    RelayError,
)

from .test_relay import (  # noqa: F401 - the hook and fixture run each test on both backends
    make_circle,
    pytest_generate_tests,
    relay_backend,
    running_relay,
    session,
)

SID = [bytes([n]) * 16 for n in range(4)]


async def test_segments_are_immutable_counted_and_freed(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice", "bob")
    async with running_relay(tmp_path / "relay", limits=Limits(quota_bytes=3000)) as relay, \
            session(relay, m["alice"], circle) as alice, session(relay, m["bob"], circle) as bob:
        assert await alice.segment_get(SID[0]) is None
        await alice.segment_put(SID[0], b"a" * 1000)
        await alice.segment_put(SID[1], b"b" * 1000)
        with pytest.raises(RelayError) as taken:  # an id names one blob forever
            await bob.segment_put(SID[0], b"c" * 10)
        assert taken.value.code == CONFLICT and not taken.value.fatal
        assert await bob.segment_get(SID[0]) == b"a" * 1000  # any member reads the circle's
        await alice.backup_put(0, 1, b"m" * 500)
        assert relay.server.used(circle.circle_id) == 2500
        with pytest.raises(RelayError) as full:
            await alice.segment_put(SID[2], b"d" * 600)
        assert full.value.code == QUOTA_EXCEEDED
        assert relay.server.used(circle.circle_id) == 2500, "a refused segment reserves nothing"
        await alice.segment_delete([SID[1], SID[3]])  # an id not stored is ignored
        assert await alice.segment_get(SID[1]) is None
        assert relay.server.used(circle.circle_id) == 1500
        await alice.segment_put(SID[2], b"d" * 600)
        assert relay.server.backup_bytes_received == 3100
    # The usage the relay computes at start-up counts segments too.
    async with running_relay(tmp_path / "relay") as relay:
        assert relay.server.used(circle.circle_id) == 2100


async def test_a_segment_over_the_wire_limit_is_refused_unread(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice")
    async with running_relay(tmp_path / "relay") as relay, session(relay, m["alice"], circle) as alice:
        with pytest.raises(RelayError) as refused:
            await alice.segment_put(SID[0], b"x" * (MAX_SEGMENT_BYTES + 1))
        assert refused.value.code == TOO_LARGE
