"""Bounded polling, for state the code exposes as counters rather than events.

Where the product has an event (the daemon's event stream, a trio.Event), tests wait on it;
where it has only a counter (status, metrics, a relay's tallies) or the change happens in
another thread, they poll it here, within a bound, so a wrong answer fails rather than hangs.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

INTERVAL_S = 0.01


async def poll_until(condition: Callable[[], bool], limit_s: float = 5.0,
                     interval_s: float = INTERVAL_S) -> None:
    with trio.fail_after(limit_s):
        while not condition():  # noqa: ASYNC110 - no event exists for what is polled
            await trio.sleep(interval_s)
