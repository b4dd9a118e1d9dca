"""Relay trouble as /v1/relays and /metrics show it: misbehaviour stays, holes while open."""

from __future__ import annotations

from meshd.api.events import EventBus
from meshd.api.metrics import MeshdMetrics
from meshd.relay.health import RelayHealth

RELAY, OTHER = "127.0.0.1:7744#k1", "127.0.0.1:7745#k2"
SENDER = bytes(range(32))


def make() -> tuple[RelayHealth, MeshdMetrics, EventBus]:
    metrics, events = MeshdMetrics(), EventBus()
    return RelayHealth(events, metrics.relay_misbehaviour, clock=lambda: 1_800_000_000.0), \
        metrics, events


def test_misbehaviour_is_shown_with_reason_and_time_and_counted() -> None:
    health, metrics, _ = make()
    assert health.annotate(RELAY, {"address": RELAY, "error": None})["error"] is None
    health.misbehaved(RELAY, "rollback", "backup version 1 is older than version 2")
    health.misbehaved(RELAY, "rollback", "again")
    entry = health.annotate(RELAY, {"address": RELAY, "error": None})
    assert entry["misbehaviour"] == {"reason": "rollback", "detail": "again",
                                     "at": 1_800_000_000.0, "count": 2}
    assert entry["error"] == "rollback at 2027-01-15T08:00:00Z: again"
    assert "misbehaviour" not in health.annotate(OTHER, {"address": OTHER})
    assert metrics.relay_misbehaviour.value(reason="rollback") == 2
    assert 'meshd_relay_misbehaviour_total{reason="rollback"} 2' in metrics.render()
    # A connection error is not hidden by it; the misbehaviour is still there beside it.
    entry = health.annotate(RELAY, {"address": RELAY, "error": "connection refused"})
    assert entry["error"] == "connection refused" and entry["misbehaviour"]["count"] == 2


def test_a_hole_is_shown_while_open_and_counted_once() -> None:
    health, metrics, _ = make()
    health.hole(RELAY, SENDER, 3)
    health.hole(RELAY, SENDER, 2)  # still open, now smaller: not a new hole
    entry = health.annotate(RELAY, {"address": RELAY, "error": None})
    assert entry["holes"] == [{"detail": f"2 envelope(s) from {SENDER.hex()[:16]} missing",
                               "since": 1_800_000_000.0}]
    assert entry["error"].startswith("hole at ")
    assert metrics.relay_misbehaviour.value(reason="hole") == 1
    assert health.total() == 1
    health.filled(SENDER)  # the missing envelopes came, from whichever relay
    entry = health.annotate(RELAY, {"address": RELAY, "error": None})
    assert "holes" not in entry and entry["error"] is None
    assert metrics.relay_misbehaviour.value(reason="hole") == 1
