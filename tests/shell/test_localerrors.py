"""Backoff for persistent local errors: a growing pause, one log line per episode and minute."""

from __future__ import annotations

from meshd.localerrors import CAP_S, LocalErrorBackoff


def test_the_pause_doubles_while_failures_continue_and_the_log_stays_quiet() -> None:
    backoff = LocalErrorBackoff()
    now, logged, delays = 0.0, 0, []
    for _ in range(12):  # each retry comes when the pause ends, and fails again
        logged += backoff.failed(now)
        delays.append(backoff.delay)
        assert backoff.paused(now) and not backoff.paused(backoff.until)
        now = backoff.until
    assert delays[:7] == [1, 2, 4, 8, 16, 32, 60] and set(delays[6:]) == {CAP_S}
    # 12 failures over about eight minutes: the first, then once a minute at most.
    assert logged <= 1 + now // CAP_S


def test_a_quiet_spell_starts_a_new_episode() -> None:
    backoff = LocalErrorBackoff()
    for now in (0.0, 1.0, 3.0):
        backoff.failed(now)
    assert backoff.delay == 4
    assert backoff.failed(1000.0), "a new episode is logged again"
    assert backoff.delay == 1
