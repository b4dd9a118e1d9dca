"""The liveness rule with a fake clock: a cut-off peer is declared dead within the named bound,
whatever our writes do; a live peer (the real channel's keepalives, delayed) never is."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from meshd.protocol.liveness import TIMERS, ConnectionTimers, Liveness, PeerNotReading, PeerSilent

from .harness import ChannelPair, drain, seeded_rng

SPEC_GONE_S = 45.0  # protocol/peers.md: a silent peer is reported gone within 45 s of the cut
MARGIN_S = 5.0

# Before the cut: receipts and writes; after it, only writes (nothing arrives any more).
before_cut = st.lists(st.tuples(st.floats(0.0, 20.0), st.sampled_from(["receive", "start", "finish"])),
                      max_size=30)
after_cut = st.lists(st.tuples(st.floats(0.0, 20.0), st.sampled_from(["start", "finish"])),
                     max_size=30)


def run_shell(liveness: Liveness, events: list[tuple[float, str]], until: float) -> float | None:
    """Drive liveness as net/transport.py does: wake at its deadline and check, and apply
    each event at its time. Returns when it was declared dead (None: not before `until`)."""
    for at, kind in [*events, (until, "end")]:
        while liveness.deadline <= at:
            wake = liveness.deadline
            try:
                liveness.check(wake)
            except (PeerSilent, PeerNotReading):
                return wake
            raise AssertionError("woken at the deadline, yet not dead")
        liveness.check(at)  # before its deadline: never dead
        if kind == "receive":
            liveness.received(at)
        elif kind == "start":
            liveness.write_started(at)
        elif kind == "finish":
            liveness.write_finished()
    return None


def timeline(steps: list[tuple[float, str]], start: float) -> list[tuple[float, str]]:
    events, now = [], start
    for gap, kind in steps:
        now += gap
        events.append((now, kind))
    return events


@given(before=before_cut, after=after_cut, quiet=st.floats(0.0, 20.0))
@settings(max_examples=300, deadline=None)
def test_a_cut_off_peer_is_declared_dead_within_silence_s_of_the_cut(
    before: list[tuple[float, str]], after: list[tuple[float, str]], quiet: float,
) -> None:
    liveness = Liveness(0.0)
    events = timeline(before, 0.0)
    # The cut: some time after the last event before it (the peer may have been quiet).
    cut = (events[-1][0] if events else 0.0) + quiet
    events += timeline(after, cut)
    dead_at = run_shell(liveness, events, until=cut + 10 * TIMERS.silence_s)
    assert dead_at is not None
    assert dead_at <= TIMERS.gone_by(cut)


@given(
    sends=st.lists(st.floats(0.0, 600.0), max_size=40),
    delays=st.lists(st.floats(0.0, TIMERS.delay_slack_s - 0.01), min_size=1, max_size=50),
)
@settings(max_examples=100, deadline=None)
def test_a_live_peer_is_never_declared_dead(sends: list[float], delays: list[float]) -> None:
    """alice's real channel sends messages at random times and keepalives at its ticks; each
    of her writes reaches bob after a delay under delay_slack_s (TCP keeps the order). bob's
    liveness, checked at every arrival and at the end, never finds her dead."""
    pair = ChannelPair.handshaken(seeded_rng(1))
    alice = pair.alice
    bob = Liveness(0.0)  # the handshake ended at 0
    pending = sorted(sends)
    arrival = 0.0
    n = 0
    now = 0.0
    end = 600.0
    while now < end:
        now = min(alice.deadline, pair.bob.deadline, pending[0] if pending else end, end)
        if pending and now == pending[0]:
            pending.pop(0)
            alice.send({"t": "test.load"})
        elif now >= alice.deadline:
            alice.handle_timeout(now)
        elif now >= pair.bob.deadline:  # bob's keepalives keep alice's own channel content
            pair.bob.handle_timeout(now)
            pair.deliver("bob", "alice")
        if data := alice.data_to_send():
            pair.bob.receive_data(data)  # bob's own channel hears her too (its coarse check)
            drain(pair.bob)
            arrival = max(arrival, now + delays[n % len(delays)])
            n += 1
            if arrival <= end:
                bob.check(arrival)  # raises if bob had declared her dead by then
                bob.received(arrival)
    bob.check(end)


def test_the_bound_holds_the_spec_with_margin() -> None:
    assert TIMERS.gone_by(100.0) - 100.0 <= SPEC_GONE_S - MARGIN_S
    assert TIMERS.delay_slack_s >= MARGIN_S  # room for a live peer's keepalive to be late
    assert TIMERS.write_stall_s <= SPEC_GONE_S - MARGIN_S


def test_timers_that_would_kill_a_live_peer_are_refused() -> None:
    with pytest.raises(ValueError, match="keepalive"):
        ConnectionTimers(keepalive_s=15.0, suspect_s=35.0, silence_s=30.0)
    with pytest.raises(ValueError, match="keepalive"):
        ConnectionTimers(keepalive_s=15.0, suspect_s=28.0, silence_s=40.0)


def test_a_write_in_progress_does_not_postpone_the_silence_bound() -> None:
    """The bug of issue 13: the dead peer was timed from the stalled write (45 s after it),
    not from the last bytes received."""
    liveness = Liveness(0.0)
    liveness.received(10.0)  # the last bytes before the cut at 10 s
    liveness.write_started(19.0)  # our send buffer filled 9 s after the cut
    assert liveness.deadline == 10.0 + TIMERS.silence_s
    with pytest.raises(PeerSilent):
        liveness.check(10.0 + TIMERS.silence_s)
