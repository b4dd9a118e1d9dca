"""`make soak`: the long fault scenarios, printing per scenario what was acknowledged, lost,
diverged, and the time to converge (tests/integration/faults.py; the short versions run in
`make test`). Real daemons and a real relay on 127.0.0.1; nothing else on the network.

    python soak/faults.py [--entries 10000] [--kills 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.faults import writer_offline_backlog  # noqa: E402


async def main(entries: int, kills: int) -> int:
    failures = 0
    for drain_kills in (0, kills):
        with tempfile.TemporaryDirectory(prefix="meshd-soak-") as root:
            outcome = await writer_offline_backlog(Path(root), entries, drain_kills=drain_kills,
                                                   limit_s=600.0)
        print(outcome.line(), flush=True)
        failures += bool(outcome.lost or outcome.diverged or outcome.warnings)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=20)
    args = parser.parse_args()
    sys.exit(trio.run(main, args.entries, args.kills))
