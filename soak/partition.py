"""`make soak` (as root): partitions of 30, 60 and 120 s between two namespace hosts, both
writing about 50 entries/s, by cutting the link and by a silent drop that keeps it up; prints
per run what was acknowledged and lost, when each side reported the peer gone, and the time
to converge after the heal (tests/netns/partition.py; the 60 s link cut runs in make test).

    python soak/partition.py [--seconds 30 60 120] [--modes link drop]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.netns.netns import available  # noqa: E402
from tests.netns.partition import partition  # noqa: E402


async def main(seconds: list[float], modes: list[str]) -> int:
    ok, why = available()
    if not ok:
        print(f"partition soak skipped: {why}")
        return 0
    failures = 0
    for mode in modes:
        for duration in seconds:
            with tempfile.TemporaryDirectory(prefix="meshd-soak-") as root:
                outcome = await partition(Path(root), duration, mode)
            print(outcome.line(), flush=True)
            # A partition longer than the dead-peer limit must be noticed on both sides.
            failures += bool(outcome.lost or outcome.converge_s > 10.0
                             or (duration >= 60.0 and len(outcome.down_after) < 2))
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[30.0, 60.0, 120.0])
    parser.add_argument("--modes", nargs="+", choices=["link", "drop"], default=["link", "drop"])
    args = parser.parse_args()
    sys.exit(trio.run(main, args.seconds, args.modes))
