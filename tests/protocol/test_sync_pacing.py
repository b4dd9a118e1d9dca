"""Pacing of a steady stream's pushes (protocol/sync.py PUSH_INTERVAL_S, issue 20): one
batch per author and peer per interval instead of one per commit; an isolated write, a
catch-up, and a peer without credit are not paced (nor held by a timer)."""

from __future__ import annotations

import math

import pytest

from meshd.protocol.sync import SyncSession

from .test_sync import OWN, A, announcing


def test_a_steady_stream_of_own_writes_is_pushed_at_most_once_per_interval() -> None:
    """20 commits/s of one entry each for 10 s: main pushed every commit (200 batches, one
    message and one receiver transaction each); paced, at most one per 0.2 s (and the
    first of the stream at once), every entry still sent, none waiting longer than that."""
    session = announcing(push_interval_s=0.2)
    sent: list[tuple[float, int]] = []  # (when, last seq)
    have = 0
    for step in range(200):
        now = 10.0 + step * 0.05
        have += 1  # a commit, which wakes the shell
        while (request := session.next_send({OWN: have}, now)) is not None:
            assert request[0] == OWN
            session.batch_sent(OWN, have, 1000)
            sent.append((now, have))
        if session.deadline({OWN: have}) <= now + 0.05:  # the shell's timer, before the next commit
            due = session.deadline({OWN: have})
            if (request := session.next_send({OWN: have}, due)) is not None:
                session.batch_sent(OWN, have, 1000)
                sent.append((due, have))
    assert sent[0] == (10.0, 1)  # the first push of the stream: at once
    assert len(sent) <= 10 / 0.2 + 1  # main: 200
    assert all(b[0] - a[0] >= 0.2 - 1e-9 for a, b in zip(sent, sent[1:], strict=False))
    assert sent[-1][1] >= 196  # nothing left behind for longer than an interval


def test_a_catch_up_and_an_isolated_write_are_not_paced() -> None:
    session = announcing(push_interval_s=0.2)
    assert session.next_send({OWN: 1}, 10.0) == (OWN, 0)
    session.batch_sent(OWN, 1, 100)
    assert session.next_send({OWN: 2}, 10.1) is None  # a stream: waits for 10.2
    assert session.deadline({OWN: 2}) == pytest.approx(10.2)
    assert session.next_send({OWN: 2}, 10.2) == (OWN, 1)
    session.batch_sent(OWN, 2, 100)
    assert session.next_send({OWN: 1000}, 10.25) == (OWN, 2)  # hundreds waiting: at once
    session.batch_sent(OWN, 1000, 100_000)
    assert session.deadline({OWN: 1000}) == math.inf  # nothing waits: no timer
    assert session.next_send({OWN: 1001}, 11.0) == (OWN, 1000)  # after a quiet interval: at once


def test_a_paced_push_sets_no_timer_without_credit_and_paces_every_author_of_a_plain_peer() -> None:
    """A peer whose hello does not announce gets every author at once (no hold): each is
    paced like our own; with its credit spent, no paced push is due (no busy timer)."""
    session = SyncSession(now=0.0, own=OWN, push_interval_s=0.2)
    session.start({}, 0.0)
    session.receive({"t": "log.hello", "vector": {}}, 0.0)
    session.receive({"t": "log.credit", "bytes": 1000}, 0.0)
    assert session.next_send({OWN: 1, A: 1}, 10.0) == (A, 0)
    session.batch_sent(A, 1, 10)
    assert session.next_send({OWN: 1, A: 1}, 10.0) == (OWN, 0)  # another author: its own interval
    session.batch_sent(OWN, 1, 10)
    assert session.next_send({OWN: 2, A: 2}, 10.1) is None
    assert session.deadline({OWN: 2, A: 2}) == pytest.approx(10.2)
    assert session.next_send({OWN: 2, A: 2}, 10.2) == (A, 1)
    session.batch_sent(A, 2, 1000)  # the credit is spent
    assert session.deadline({OWN: 3, A: 2}) == math.inf
    assert session.next_send({OWN: 3, A: 2}, 10.5) is None


def test_a_catch_up_of_large_entries_is_not_paced() -> None:
    """Entries of 100 KB: a full batch holds about ten, far fewer than PUSH_PACE_ENTRIES,
    yet the batch after a full one goes at once (a paced catch-up would crawl at one batch
    per interval); the push after the catch-up's last, short batch is paced."""
    session = announcing(push_interval_s=0.2, batch_bytes=1_000_000)
    session.receive({"t": "log.credit", "bytes": 8_000_000}, 0.0)
    have = 50
    assert session.next_send({OWN: have}, 10.0) == (OWN, 0)
    session.batch_sent(OWN, 10, 1_000_000)  # full
    assert session.next_send({OWN: have}, 10.0) == (OWN, 10)
    session.batch_sent(OWN, 20, 1_000_000)  # full
    assert session.next_send({OWN: have}, 10.0) == (OWN, 20)
    session.batch_sent(OWN, 50, 300_000)  # the rest: short
    assert session.next_send({OWN: 51}, 10.1) is None
    assert session.deadline({OWN: 51}) == pytest.approx(10.2)
