"""Messages per entry in a circle of three (protocol/logs.md, "log.have" and step 4): an
entry crosses each link once, from its author, and credit comes back in bulk. Counted on
the wire between three LogServices joined by memory channels; no timing is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from meshd.net.logsync import LogService
from meshd.protocol import sync

from .test_logsync import Link, service, wait_until

WRITES = 30


def entries_of(link: Link, side: str, author: bytes) -> int:
    return sum(len(m["headers"]) for m in link.sent[side]
               if m["t"] == "log.entries" and m["author"] == author)


def announced(link: Link, side: str, author: bytes) -> int:
    return max((m["vector"].get(author, 0) for m in link.sent[side] if m["t"] == "log.have"),
               default=0)


def credits(link: Link, side: str) -> int:
    return sum(m["t"] == "log.credit" for m in link.sent[side])


async def test_in_a_circle_of_three_each_entry_crosses_each_link_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A hold far beyond the test's run: a forward now could only come from the rule, not a
    # slow machine (the announcement arriving after the hold ran out).
    monkeypatch.setattr(sync, "FORWARD_HOLD_S", 3600.0, raising=False)
    monkeypatch.setattr(sync, "HAVE_INTERVAL_S", 0.0, raising=False)  # announce at once
    a, b, c = service(tmp_path, 1), service(tmp_path, 2), service(tmp_path, 3)
    ab, ac, bc = Link(a, b), Link(a, c), Link(b, c)
    everyone: tuple[LogService, ...] = (a, b, c)
    async with trio.open_nursery() as nursery:
        for link in (ab, ac, bc):
            link.start(nursery)
        for i in range(WRITES):
            await a.write("s", f"a{i}", bytes(200))
            await b.write("s", f"b{i}", bytes(200))
        # Converged in every store, and every receiving PeerSync has had its commit answered
        # (a store shows a batch before the trio thread hears of it: the announcements are
        # made once it has).
        await wait_until(lambda: all(s.version_vector() == {a.author: WRITES, b.author: WRITES}
                                     for s in everyone)
                         and ab.a.entries_received + ac.a.entries_received == WRITES
                         and ab.b.entries_received + bc.a.entries_received == WRITES
                         and ac.b.entries_received + bc.b.entries_received == 2 * WRITES,
                         *everyone)
        await trio.testing.wait_all_tasks_blocked()  # the last announcements are out
        nursery.cancel_scope.cancel()
    # Both b and c told each other they hold all of a's entries (and c and a, of b's): each
    # holds them for the other, so each must announce, or the hold runs out and they go.
    assert announced(bc, "a", a.author) == announced(bc, "b", a.author) == WRITES
    assert announced(ac, "a", b.author) == announced(ac, "b", b.author) == WRITES
    # Each author's entries went straight to the other two...
    assert entries_of(ab, "a", a.author) == entries_of(ac, "a", a.author) == WRITES
    assert entries_of(ab, "b", b.author) == entries_of(bc, "a", b.author) == WRITES
    # ...and no device forwarded them again to a peer that had them from their author.
    assert entries_of(bc, "a", a.author) == entries_of(bc, "b", a.author) == 0
    assert entries_of(ac, "b", b.author) == entries_of(ac, "a", b.author) == 0
    # One credit per direction (the window at the start): 60 small batches stay far under
    # half a window, so none comes back per batch.
    for link in (ab, ac, bc):
        assert credits(link, "a") == credits(link, "b") == 1


async def test_a_peer_that_lacks_an_authors_entries_still_gets_them_forwarded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """b holds a's entries for c (which announces) and, as c never gets them from a (no
    link), forwards them once the hold runs out (shortened here)."""
    monkeypatch.setattr(sync, "FORWARD_HOLD_S", 0.05, raising=False)
    a, b, c = service(tmp_path, 1), service(tmp_path, 2), service(tmp_path, 3)
    ab, bc = Link(a, b), Link(b, c)
    async with trio.open_nursery() as nursery:
        ab.start(nursery)
        bc.start(nursery)
        for i in range(WRITES):
            await a.write("s", f"a{i}", bytes(200))
        await wait_until(lambda: c.version_vector().get(a.author) == WRITES, c)
        nursery.cancel_scope.cancel()
    assert entries_of(bc, "a", a.author) == WRITES
    assert [m for m in bc.sent["b"] if m["t"] == "log.have"] == []  # c had nothing to announce
