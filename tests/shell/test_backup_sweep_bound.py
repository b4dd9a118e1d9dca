"""A sweep (meshd/backupsweep.py) is bounded in time, not only in pages.

The backup loop uploads to its relays one after another (meshd/relay/backuploop.py), and the
sweep runs inside an upload. A relay that answers every page of relay.segment_list just before
the request timeout, always with `more` and an id the manifest does not list (whose delete it
also answers just in time), held the sweep for MAX_SWEEP_PAGES pages of two requests each:
about 256 x 58 s, over four hours in every six, during which no relay got an upload. Virtual
time (trio's autojump clock): what is counted is pages, not seconds."""

from __future__ import annotations

import trio

from meshd.backupstate import REQUEST_TIMEOUT_S
from meshd.backupsweep import MAX_SWEEP_PAGES, sweep
from meshd.protocol.backupset import Manifest


class StallingRelay:
    """Answers each request a second before its timeout; lists one new id per page, forever."""

    def __init__(self) -> None:
        self.pages = 0
        self.deleted: list[bytes] = []

    async def segment_list(self, after: bytes = b"", limit: int | None = None,
                           device: bytes = b"") -> tuple[list[tuple[bytes, int]], bool]:
        self.pages += 1
        await trio.sleep(REQUEST_TIMEOUT_S - 1)
        return [(self.pages.to_bytes(16, "big"), 100)], True

    async def segment_delete(self, ids: list[bytes]) -> None:
        await trio.sleep(REQUEST_TIMEOUT_S - 1)
        self.deleted.extend(ids)


async def test_a_relay_that_answers_just_in_time_holds_the_sweep_a_bounded_while(autojump_clock: trio.abc.Clock) -> None:
    relay = StallingRelay()
    swept = await sweep(relay, Manifest())  # type: ignore[arg-type]
    assert not swept.complete
    assert relay.pages <= 5, f"{relay.pages} pages of {MAX_SWEEP_PAGES} asked"
    assert swept.deleted == len(relay.deleted) > 0  # what it did delete is counted
