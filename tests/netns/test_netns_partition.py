"""A partition of a minute with both sides writing, then a heal: the connection is declared
dead during the partition (not left "connected" in a zero window), and both sides converge
once the link is back. Two real daemons on two namespace hosts; needs root."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.integration.daemons import DaemonProcess, form_circle

from .netns import Network, available

OK, WHY_NOT = available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not OK, reason=WHY_NOT)]

PARTITION_S = 60.0
WRITE_INTERVAL_S = 0.02  # about 50 entries/s per side: the load of the reported hang
DEAD_WITHIN_S = 45.0 + 15.0  # the spec's 45 s, plus at most one keepalive tick
HEAL_S = 30.0


async def _connected(daemon: DaemonProcess) -> bool:
    return bool((await daemon.status())["peers_connected"])


@pytest.mark.slow
async def test_a_minute_long_partition_with_both_sides_writing_heals(tmp_path: Path) -> None:
    with Network(devices=2) as network:
        daemons = [DaemonProcess(tmp_path, name, listen="0.0.0.0:7743", netns=network.ns(n),
                                 interfaces=[network.address(n)])
                   for n, name in enumerate(("left", "right"), start=1)]
        try:
            await form_circle(daemons)
            written: dict[str, set[str]] = {d.name: set() for d in daemons}
            cut_at = trio.current_time()
            down_after: dict[str, float] = {}

            async def write(daemon: DaemonProcess, until: float) -> None:
                n = 0
                while trio.current_time() < until:
                    text = f"{daemon.name} {n} " + "x" * 200
                    await daemon.write("load", text)
                    written[daemon.name].add(text)
                    n += 1
                    await trio.sleep(WRITE_INTERVAL_S)  # pacing the load, not synchronising

            async def watch_down(daemon: DaemonProcess) -> None:
                # Polled (status is a counter; the event stream is busy with the writes).
                with trio.move_on_after(PARTITION_S):
                    while await _connected(daemon):  # noqa: ASYNC110 - polled counter
                        await trio.sleep(0.5)
                    down_after[daemon.name] = trio.current_time() - cut_at

            async with trio.open_nursery() as nursery:
                # Both sides write before, during and after the cut, so send buffers fill.
                for daemon in daemons:
                    nursery.start_soon(write, daemon, trio.current_time() + 5 + PARTITION_S)
                await trio.sleep(5)
                network.link_down(2)
                cut_at = trio.current_time()
                for daemon in daemons:
                    nursery.start_soon(watch_down, daemon)
            assert set(down_after) == {"left", "right"}, f"still reported connected: {down_after}"
            for name, after in down_after.items():
                assert after <= DEAD_WITHIN_S, f"{name} reported the peer connected for {after:.0f} s"
            network.link_up(2)
            healed = trio.current_time()
            everything = written["left"] | written["right"]
            with trio.fail_after(HEAL_S):
                for daemon in daemons:
                    while (await daemon.status())["entries"] < len(everything):  # noqa: ASYNC110
                        await trio.sleep(0.2)  # polled, bounded by HEAL_S
            print(f"partition {PARTITION_S:.0f} s: dead after {down_after}; converged "
                  f"{trio.current_time() - healed:.1f} s after the heal; {len(everything)} entries")
            for daemon in daemons:
                assert set(await daemon.texts("load")) >= everything
        finally:
            for daemon in daemons:
                daemon.kill()
