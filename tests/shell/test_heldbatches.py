"""Out-of-order relay batches are held in the store: they survive a restart, come back in
order once the hole before them fills, and stay bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshd.heldbatches import HeldBatches
from meshd.store.db import Store

ALICE = b"a" * 32
BOB = b"b" * 32


def batch(author: bytes, first: int, last: int) -> dict[str, Any]:
    return {"t": "log.entries", "author": author,
            "headers": [f"h{n}".encode() for n in range(first, last + 1)],
            "bodies": [None] * (last - first + 1), "head": {"seq": last, "hash": b"x" * 32, "sig": b"s" * 64}}


def test_held_batches_survive_a_restart_and_come_back_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    held = HeldBatches(store)
    held.hold(batch(ALICE, 21, 30))
    held.hold(batch(ALICE, 11, 20))
    held.hold(batch(ALICE, 11, 20))  # a copy from a second relay
    held.hold(batch(BOB, 5, 9))
    store.close()

    store = Store(tmp_path / "db")  # the daemon restarted
    held = HeldBatches(store)
    assert len(held) == 3
    assert held.release(ALICE, 5) == [], "the hole 6..10 is still open"
    for tip, expected in ((10, 20), (20, 30)):  # each comes back once the log reaches it
        ((slot, ready),) = held.release(ALICE, tip)
        assert ready["head"]["seq"] == expected
        held.forget(slot)
    assert held.release(ALICE, 30) == [] and len(held) == 1
    assert [b["head"]["seq"] for _, b in held.release(BOB, 4)] == [9]
    assert held.release(BOB, 9) == [] and len(held) == 0, "wholly received: forgotten"
    store.close()


def test_past_the_bound_the_batch_furthest_ahead_is_dropped(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    held = HeldBatches(store, limit=2)
    held.hold(batch(ALICE, 11, 20))
    held.hold(batch(ALICE, 31, 40))
    held.hold(batch(ALICE, 21, 30))  # evicts 31..40
    held.hold(batch(ALICE, 41, 50))  # furthest ahead itself: not kept
    assert held.dropped == 2
    assert [b["head"]["seq"] for _, b in held.release(ALICE, 10)] == [20]
    assert [b["head"]["seq"] for _, b in held.release(ALICE, 20)] == [30], "11..20 arrived"
    store.close()
