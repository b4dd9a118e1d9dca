"""Fault scenarios with real daemons and a real relay, sized by the caller: the short
versions run in the test suite (tests/integration/test_relay_backlog.py), the long ones
under `make soak` (soak/faults.py), which prints each Outcome.

Every scenario counts what the daemons acknowledged (an API write that returned), what the
receiving device ended with, and how long it took to converge once it could.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .daemons import DaemonProcess, RelayProcess, pair, start_all, wait_connected

POLL_S = 0.05  # status is a counter: polled, always within a bound


@dataclass(frozen=True)
class Outcome:
    scenario: str
    acknowledged: int  # writes the API acknowledged
    lost: int  # acknowledged entries the receiver does not have
    diverged: int  # entries the receiver has that were never written (must be 0)
    converge_s: float  # from the receiver's start (relay only) to holding everything
    queued: int  # envelopes sealed for the receiver
    relay_kills: int
    warnings: int  # relay.sequence warnings ("arrived ahead/late") at the receiver

    def line(self) -> str:
        return (f"{self.scenario}: acknowledged {self.acknowledged}, lost {self.lost}, "
                f"diverged {self.diverged}, converged in {self.converge_s:.1f} s "
                f"({self.queued} envelopes queued, {self.relay_kills} relay kill -9s, "
                f"{self.warnings} sequence warnings)")


async def wait_status(daemon: DaemonProcess, check: Callable[[dict[str, Any]], bool],
                      limit_s: float, what: str) -> dict[str, Any]:
    with trio.move_on_after(limit_s):
        while True:
            status = await daemon.status()
            if check(status):
                return status
            await trio.sleep(POLL_S)  # noqa: ASYNC110 - no event for this counter
    raise AssertionError(f"{daemon.name}: timed out waiting for {what}: {await daemon.status()}"
                         f"\n--- log ---\n{daemon.log()[-4000:]}")


async def writer_offline_backlog(root: Path, entries: int, *, drain_kills: int = 0,
                                 limit_s: float = 300.0) -> Outcome:
    """alpha and beta pair; beta goes offline; alpha writes `entries` entries, waits until
    they are all at the relay, and goes offline for good; beta returns relay-only and must
    end with every one of them, while the relay is killed (-9) `drain_kills` times as beta
    drains."""
    relay = RelayProcess(root)
    address = await relay.start()
    # No gathering of commits into one envelope: the backlog is made of envelopes (writes
    # as fast as they commit would otherwise be ~4 envelopes per second).
    alpha = DaemonProcess(root, "alpha", relays=[address], deposit_gather=0)
    beta = DaemonProcess(root, "beta", relays=[address])
    try:
        await start_all([alpha, beta])
        await pair(alpha, beta)
        await wait_connected(alpha, 1)
        status = await beta.status()
        beta_key, before = status["device"], status["entries"]
        assert await beta.stop() == 0

        written = [f"backlog {n}" for n in range(entries)]
        for text in written:
            await alpha.write("backlog", text)
        status = await wait_status(alpha, lambda s: s["relay_outbox"][beta_key]["behind"] == 0,
                                   limit_s, "alpha's deposits for beta")
        queued = status["relay_outbox"][beta_key]["envelopes"]
        assert await alpha.stop() == 0

        beta.reconfigure(discovery=False)
        started = trio.current_time()
        await beta.start()
        target = before + entries
        with trio.fail_after(limit_s):
            for kill in range(drain_kills):
                # Kill while beta is part-way through: as soon as it has begun, then at each
                # further share of the backlog (it drains only while the relay is up).
                mark = before + max(1, entries * kill // drain_kills)
                await wait_status(beta, lambda s, mark=mark: s["entries"] >= mark, limit_s,
                                  f"{mark} entries")
                relay.kill()
                await relay.start()
        converge_s = float("inf")  # unless it converges within the limit
        with trio.move_on_after(limit_s):
            while (await beta.status())["entries"] < target:  # noqa: ASYNC110 - a counter
                await trio.sleep(POLL_S)
            converge_s = trio.current_time() - started
        have = set(await beta.texts("backlog"))
        log = beta.log()
        return Outcome(
            scenario=f"writer offline, {entries} entries, {drain_kills} relay kills while draining",
            acknowledged=entries, lost=len(set(written) - have), diverged=len(have - set(written)),
            converge_s=converge_s, queued=queued, relay_kills=drain_kills,
            warnings=log.count("arrived ahead") + log.count("arrived late"))
    finally:
        for process in (alpha, beta, relay):
            process.kill()
        await trio.lowlevel.checkpoint()
