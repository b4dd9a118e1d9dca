"""RefusalTally: one line per cause per source per interval, with a count; bounded memory."""

from __future__ import annotations

import logging

import pytest

from meshd.net.tally import RefusalTally, cause_of, host_of

log = logging.getLogger("test.tally")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.tally"]


def test_one_line_per_cause_and_source_then_a_summary_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    reports: list[tuple[str, str, int]] = []
    tally = RefusalTally(log, "handshakes", interval_s=60,
                         on_report=lambda *report: reports.append(report))
    with caplog.at_level(logging.WARNING, logger="test.tally"):
        for i in range(3413):
            tally.note("bad-mac", "127.0.0.1", now=i / 100, detail="bad MAC")  # 34 s
        tally.note("timeout", "127.0.0.1", now=35)
        tally.note("bad-mac", "10.0.0.1", now=35)
        tally.note("bad-mac", "127.0.0.1", now=61)
    assert lines(caplog) == [
        "refused handshake from 127.0.0.1: bad-mac: bad MAC (more are counted, one line per 60 s)",
        "refused handshake from 127.0.0.1: timeout (more are counted, one line per 60 s)",
        "refused handshake from 10.0.0.1: bad-mac (more are counted, one line per 60 s)",
        "refused 3412 handshakes from 127.0.0.1 in the last 61 s (bad-mac)",
    ]
    assert reports == [("bad-mac", "127.0.0.1", 1), ("timeout", "127.0.0.1", 1),
                       ("bad-mac", "10.0.0.1", 1), ("bad-mac", "127.0.0.1", 3412)]


def test_memory_is_bounded_during_an_attack_and_swept_after_it(caplog: pytest.LogCaptureFixture) -> None:
    tally = RefusalTally(log, "handshakes", interval_s=60, max_pairs=16)
    with caplog.at_level(logging.WARNING, logger="test.tally"):
        for i in range(10_000):
            tally.note("bad-mac", f"10.0.{i // 256}.{i % 256}", now=i / 1000)
        assert len(tally) <= 17  # 16 sources and the "other addresses" bucket
        assert len(lines(caplog)) <= 17
        tally.note("bad-mac", "192.0.2.1", now=100)  # the next interval: counts logged
        tally.note("bad-mac", "192.0.2.1", now=200)  # and then the quiet windows forgotten
    assert len(tally) == 1


def test_sources_lose_their_port_and_causes_are_short_codes() -> None:
    assert host_of("127.0.0.1:5555") == "127.0.0.1"
    assert host_of("::1:5555") == "::1"
    assert host_of("[::1]:5555") == "::1"
    assert host_of(None) == "unknown"

    class Coded(Exception):
        reason = "stalled"

    assert cause_of(Coded("x")) == "stalled"
    assert cause_of(ValueError("peer(ab12…cd) is not authorised here")) == (
        "ValueError: peer(…) is not authorised here")
    assert cause_of(ValueError("frame of 65535 bytes exceeds 4096")) == cause_of(
        ValueError("frame of 123 bytes exceeds 4096")) == "ValueError: frame of N bytes exceeds N"


def test_names_with_digits_are_kept() -> None:
    assert cause_of(ValueError("X25519 with a low-order point")) == "ValueError: X25519 with a low-order point"
