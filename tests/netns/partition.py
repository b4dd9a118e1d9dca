"""A partition between two namespace hosts with both sides writing about 50 entries/s, then
a heal: the scenario behind tests/netns/test_netns_partition.py (short) and soak/partition.py
(30, 60 and 120 s; the link cut, or a silent drop that keeps the link up). With three hosts,
the second is cut off from the other two, which stay connected to each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trio

from tests.integration.daemons import DaemonProcess, form_circle

from .netns import Network

STEADY_S = 5.0  # both report the peer connected this long without a gap: settled
WRITE_INTERVAL_S = 0.02  # about 50 entries/s per side: the load of the reported hang
LEAD_S = 5.0  # writing before the cut, so both sides have traffic in flight


@dataclass(frozen=True)
class PartitionOutcome:
    seconds: float
    mode: str  # "link" (the bridge port down) or "drop" (every packet dropped, link up)
    acknowledged: int
    lost: int  # acknowledged entries missing on either side after the heal
    down_after: dict[str, float]  # per side: seconds from the cut until it reported the peer gone
    converge_s: float  # from the heal until both hold everything (inf: not within the limit)
    # Seconds after convergence until both sides had reported the peer connected for
    # STEADY_S together (inf: not within the limit): the pair settles on one connection.
    settled_s: float = float("inf")
    hosts: int = 2

    def line(self) -> str:
        down = ", ".join(f"{name} {after:.1f} s" for name, after in sorted(self.down_after.items()))
        return (f"partition {self.seconds:.0f} s ({self.mode}, {self.hosts} hosts): "
                f"acknowledged {self.acknowledged}, "
                f"lost {self.lost}, peer reported gone after: {down or 'never'}; converged "
                f"{self.converge_s:.1f} s after the heal; both connected, steadily, "
                f"{self.settled_s:.1f} s after that")


NAMES = ("left", "right", "third")  # "right" (host 2) is the one cut off


async def _connected(daemon: DaemonProcess, hosts: int) -> bool:
    """Whether the daemon reports every other host connected."""
    return int((await daemon.status())["peers_connected"]) >= hosts - 1


async def partition(root: Path, seconds: float, mode: str = "link", *,
                    heal_limit_s: float = 60.0, hosts: int = 2) -> PartitionOutcome:
    if hosts not in (2, 3):
        raise ValueError("two or three hosts")
    with Network(devices=hosts) as network:
        daemons = [DaemonProcess(root, name, listen="0.0.0.0:7743", netns=network.ns(n),
                                 interfaces=[network.address(n)])
                   for n, name in enumerate(NAMES[:hosts], start=1)]
        try:
            await form_circle(daemons)
            written: set[str] = set()
            down_after: dict[str, float] = {}
            cut_at = trio.current_time()

            async def write(daemon: DaemonProcess, until: float) -> None:
                n = 0
                while trio.current_time() < until:
                    text = f"{daemon.name} {n} " + "x" * 200
                    await daemon.write("load", text)
                    written.add(text)
                    n += 1
                    await trio.sleep(WRITE_INTERVAL_S)  # pacing the load, not synchronising

            async def watch_down(daemon: DaemonProcess) -> None:
                with trio.move_on_after(seconds):
                    while await _connected(daemon, hosts):  # noqa: ASYNC110 - a counter
                        await trio.sleep(0.5)
                    down_after[daemon.name] = trio.current_time() - cut_at

            async with trio.open_nursery() as nursery:
                for daemon in daemons:
                    nursery.start_soon(write, daemon, trio.current_time() + LEAD_S + seconds)
                await trio.sleep(LEAD_S)
                if mode == "link":
                    network.link_down(2)
                else:
                    network.impair(2, loss=1.0, reorder=False)
                cut_at = trio.current_time()
                for daemon in daemons:
                    nursery.start_soon(watch_down, daemon)
            if mode == "link":
                network.link_up(2)
            else:
                network.clear_impairment(2)
            healed = trio.current_time()
            converge_s = float("inf")
            with trio.move_on_after(heal_limit_s):
                for daemon in daemons:
                    while (await daemon.status())["entries"] < len(written):  # noqa: ASYNC110
                        await trio.sleep(0.2)
                converge_s = trio.current_time() - healed
            converged = trio.current_time()
            settled_s = float("inf")
            with trio.move_on_after(heal_limit_s):
                steady_since: float | None = None
                while True:
                    both = all([await _connected(daemon, hosts) for daemon in daemons])
                    now = trio.current_time()
                    if not both:
                        steady_since = None
                    elif steady_since is None:
                        steady_since = now
                    elif now - steady_since >= STEADY_S:
                        settled_s = steady_since - converged
                        break
                    await trio.sleep(0.2)  # noqa: ASYNC110 - polling a status counter
            lost = 0
            for daemon in daemons:
                lost = max(lost, len(written - set(await daemon.texts("load"))))
            return PartitionOutcome(seconds, mode, len(written), lost, down_after, converge_s,
                                    settled_s, hosts)
        finally:
            for daemon in daemons:
                daemon.kill()
