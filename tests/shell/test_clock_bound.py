"""Far-future timestamps: refused on receipt, ignored at start-up, so one hostile member's
entries can neither hide a stream's future nor block local writes (protocol/logs.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from meshd.net.logsync import LogService
from meshd.protocol.log import (
    CLEAR,
    MAX_HLC,
    Batch,
    EntryRejected,
    Write,
    compose_batch,
    hlc_limit,
    verify_batch,
)
from meshd.store.db import Store

from ..protocol.test_log import allow_all, signer
from .test_logsync import Link, wait_until

WALL_MS = 1_700_000_000_000
TEN_YEARS_MS = 10 * 365 * 86_400_000


def hostile_clear(seed: int, stream: str, *, last_hlc: int, wall_ms: int) -> Batch:
    """A member's signed clear of stream dated by last_hlc/wall_ms (first entry of its log)."""
    verified = compose_batch(signer(seed), 0, bytes(32), last_hlc, wall_ms,
                             [Write(stream, "", CLEAR)])
    return Batch(verified.author, verified.headers, verified.bodies, verified.heads[-1])


FAR_FUTURE = [
    pytest.param({"last_hlc": MAX_HLC - 1, "wall_ms": WALL_MS}, id="max-hlc"),
    pytest.param({"last_hlc": 0, "wall_ms": WALL_MS + TEN_YEARS_MS}, id="ten-years"),
]


def service(path: Path, seed: int, wall: list[int]) -> LogService:
    return LogService(Store(path), signer(seed), lambda: wall[0])


@pytest.mark.parametrize("dated", FAR_FUTURE)
def test_a_far_future_entry_is_refused_on_receipt_and_hides_nothing(tmp_path: Path, dated: dict[str, int]) -> None:
    wall = [WALL_MS]
    alice = service(tmp_path / "a.db", 1, wall)
    alice.write_nowait("chat", "m1", b"before")
    with pytest.raises(EntryRejected) as caught:
        alice.ingest_batch(hostile_clear(9, "chat", **dated), allow_all)
    assert caught.value.reason == "clock-ahead"
    alice.write_nowait("chat", "m2", b"after")
    assert [r["body"] for r in alice.read("chat")["records"]] == [b"before", b"after"]


def test_the_bound_is_the_receivers_clock_plus_24_hours() -> None:
    batch = hostile_clear(9, "chat", last_hlc=0, wall_ms=WALL_MS + 23 * 3_600_000)
    assert len(verify_batch(batch, 0, bytes(32), allow_all, hlc_bound=hlc_limit(WALL_MS))) == 1
    batch = hostile_clear(9, "chat", last_hlc=0, wall_ms=WALL_MS + 25 * 3_600_000)
    with pytest.raises(EntryRejected, match="clock-ahead"):
        verify_batch(batch, 0, bytes(32), allow_all, hlc_bound=hlc_limit(WALL_MS))


@pytest.mark.parametrize("dated", FAR_FUTURE)
def test_a_bad_stored_timestamp_never_blocks_local_writes_after_a_restart(
        tmp_path: Path, dated: dict[str, int]) -> None:
    wall = [WALL_MS]
    path = tmp_path / "a.db"
    store = Store(path)
    # What an older meshd accepted: the entry is in the store, past the bound.
    batch = hostile_clear(9, "chat", **dated)
    store.commit_batch(verify_batch(batch, 0, bytes(32), allow_all), durable=True)
    store.close()
    restarted = service(path, 1, wall)
    for i in range(3):
        restarted.write_nowait("notes", f"n{i}", b"works")  # was OverflowError -> HTTP 500
    records = restarted.read("notes")["records"]
    assert len(records) == 3
    # ... and dated by our clock, not dragged into the hostile entry's future.
    assert all(0 <= (r["hlc"] >> 16) - WALL_MS < 1000 for r in records)


async def test_a_refused_batch_does_not_end_the_sync_of_other_authors(tmp_path: Path) -> None:
    wall = [WALL_MS]
    a = service(tmp_path / "a.db", 1, wall)
    b = service(tmp_path / "b.db", 2, wall)
    # b forwards an entry from a hostile author that only b's looser past accepted.
    b.store.commit_batch(verify_batch(hostile_clear(9, "other", last_hlc=MAX_HLC - 1, wall_ms=WALL_MS),
                                      0, bytes(32), allow_all), durable=True)
    b.write_nowait("chat", "m1", b"from b")
    link = Link(a, b)
    async with trio.open_nursery() as nursery:
        link.start(nursery)
        await wait_until(lambda: a.version_vector().get(b.author) == 1, a)
        nursery.cancel_scope.cancel()
    assert bytes(signer(9).public) not in a.version_vector()
    assert [r["body"] for r in a.read("chat")["records"]] == [b"from b"]
