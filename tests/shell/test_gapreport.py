"""A gap in a sender's relay envelopes is logged once when it opens and once when it fills."""

from __future__ import annotations

import logging

import pytest

from meshd.gapreport import GapReporter
from meshd.protocol.envelope import Arrival, SequenceTracker

SENDER = bytes([7]) * 32


def test_hundreds_of_envelopes_past_a_hole_make_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    tracker, gaps = SequenceTracker(), GapReporter()

    def arrive(seq: int) -> Arrival:
        arrival = tracker.accept(SENDER, seq)
        if arrival is not Arrival.IN_ORDER or gaps.is_open(SENDER):
            gaps.arrived("relay-1", SENDER, seq, tracker.missing(SENDER))
        return arrival

    caplog.set_level(logging.INFO, logger="meshd.relay.links")
    assert arrive(1) is Arrival.IN_ORDER
    for seq in range(3, 303):  # envelope 2 was dropped: 300 arrive ahead of it
        assert arrive(seq) is Arrival.AHEAD
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "missing: [(2, 2)]" in warnings[0].getMessage()
    assert arrive(2) is Arrival.LATE  # the resend fills it
    assert arrive(303) is Arrival.IN_ORDER
    filled = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(filled) == 1 and "301 arrived out of order" in filled[0]
    for seq in range(305, 310):  # a second gap is a second report
        arrive(seq)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
