"""A mailbox backlog far beyond any buffer reaches its device whole, through the relay only.

The writer goes offline for good once its envelopes are at the relay, so the relay is the only
source: every entry the writer acknowledged must arrive, and nothing may stay missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from .daemons import DaemonProcess, pair, start_all, wait_connected
from .faults import wait_status as _wait_status
from .faults import writer_offline_backlog
from .relayed import relay_and_daemons, relay_connected

BACKLOG_ENTRIES = 8000  # deposits keep up with writes less than 1:1 (issue 20: ~0.3 envelopes per entry)
MIN_ENVELOPES = 1000  # the point of the test: far more than any device-side buffer
DRAIN_S = 120.0
KILLS = 5
ENTRIES_PER_KILL = 40


@pytest.mark.slow
async def test_a_backlog_of_thousands_of_envelopes_arrives_whole(tmp_path: Path) -> None:
    outcome = await writer_offline_backlog(tmp_path, BACKLOG_ENTRIES, limit_s=DRAIN_S)
    print(outcome.line())
    assert outcome.queued >= MIN_ENVELOPES, "not a backlog"
    assert (outcome.lost, outcome.diverged, outcome.warnings) == (0, 0, 0), outcome.line()


@pytest.mark.slow
async def test_relay_kills_while_the_device_drains_lose_nothing(tmp_path: Path) -> None:
    outcome = await writer_offline_backlog(tmp_path, 1000, drain_kills=3, limit_s=DRAIN_S)
    print(outcome.line())
    assert (outcome.lost, outcome.diverged, outcome.warnings) == (0, 0, 0), outcome.line()


async def test_pair_then_write_at_once_through_the_relay_leaves_no_hole(tmp_path: Path) -> None:
    """A pairing changes the circle (a new member, a new epoch) while the first envelopes for
    the new device are being deposited: none of their sequence numbers may be lost, or the
    new device reports a hole (relay.sequence) for every later envelope."""
    async with relay_and_daemons(tmp_path, start=False) as setup:
        address = setup.address
        home = setup.daemon("home", discovery=False)
        away = setup.daemon("away", use_relay=False, discovery=False)
        await start_all([home, away])
        await relay_connected(home, 10.0)
        code = (await home.request("POST", "/v1/invite"))["code"]
        texts = {f"at once {n}" for n in range(5)}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(away.request, "POST", "/v1/join", {"code": code, "relay": address})

            async def write_as_soon_as_paired() -> None:
                await home.until(lambda: _two_devices(home), 20.0, "the pairing")
                for text in sorted(texts):
                    await home.write("chat", text)

            nursery.start_soon(write_as_soon_as_paired)
        await _wait_status(away, lambda s: s["entries"] >= len(texts), 20.0, "the entries")
        assert set(await away.texts("chat")) >= texts
        # Everything sealed for away arrived in sequence: no number burned, none reordered
        # (each out-of-sequence arrival is logged with its relay.sequence event).
        log = away.log()
        assert "arrived ahead" not in log and "arrived late" not in log, log[-3000:]


async def _two_devices(daemon: DaemonProcess) -> bool:
    return (await daemon.status())["devices"] >= 2


@pytest.mark.slow
async def test_relay_kills_during_deposits_burn_no_sequence_number(tmp_path: Path) -> None:
    """kill -9 of the relay while envelopes are being deposited: a deposit that got no answer
    is deposited again with its own seq, so the recipient sees no hole, and nothing is lost."""
    async with relay_and_daemons(tmp_path, ["alpha", "beta"]) as setup:
        relay, (alpha, beta) = setup.relay, setup.daemons
        await pair(alpha, beta)
        await wait_connected(alpha, 1)
        status = await beta.status()
        beta_key, before = status["device"], status["entries"]
        assert await beta.stop() == 0
        written = 0
        for _ in range(KILLS):
            for _ in range(ENTRIES_PER_KILL):
                await alpha.write("kills", f"entry {written}")
                written += 1
            relay.kill()  # SIGKILL, mid-stream: deposits in flight get no answer
            await relay.start()
        await _wait_status(alpha, lambda s: s["relay_outbox"][beta_key]["behind"] == 0,
                           60.0, "alpha's deposits for beta")
        assert await alpha.stop() == 0

        beta.reconfigure(discovery=False)
        await beta.start()
        expected = before + written
        await _wait_status(beta, lambda s: s["entries"] >= expected, DRAIN_S, "every entry")
        assert sorted(await beta.texts("kills")) == sorted(f"entry {n}" for n in range(written))
        log = beta.log()
        assert "arrived ahead" not in log and "arrived late" not in log, log[-3000:]


@pytest.mark.slow
async def test_a_rate_limited_last_deposit_is_tried_again(tmp_path: Path) -> None:
    """The relay rate-limits the writer's deposits; after its last write nothing else wakes
    the deposit loop, yet everything reaches the relay (it once waited forever for a commit)."""
    async with relay_and_daemons(tmp_path, ["alpha", "beta"],
                                 relay_extra=("--rate", "2", "--burst", "10")) as setup:
        alpha, beta = setup.daemons
        await pair(alpha, beta)
        await wait_connected(alpha, 1)
        beta_key = (await beta.status())["device"]
        assert await beta.stop() == 0
        for n in range(30):
            await alpha.write("burst", f"entry {n}")
        await _wait_status(alpha, lambda s: "rate-limited" in alpha.log(), 30.0,
                           "a rate-limited deposit")
        await _wait_status(alpha, lambda s: s["relay_outbox"][beta_key]["behind"] == 0, 60.0,
                           "alpha's deposits for beta")
