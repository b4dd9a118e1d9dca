"""Two daemons stopped at (nearly) the same instant while one streams entries to the other:
how often a daemon exits with a non-zero status on SIGTERM (review s7, part 1).

Each trial pairs a fresh alpha and beta (no mDNS), writes 20,000 entries at alpha, sends
SIGTERM to alpha (its goodbye, or a write it cut short, reaches beta while beta commits what
it received) and SIGTERM to beta 0-30 ms later. main exited 1 in about 1 trial in 30: a
connection's error raised while beta's nursery was being cancelled escaped it (peers.py), and
alpha's goodbye, written after a frame it cut short, read as "bad MAC" (transport.py). The
trees are run alternately, trial by trial, in the same run:

    python bench/stop_race.py [--main DIR] [--trials 30] [--minutes 10]

--main: a tree of main (default: made with `git archive main` into a temporary directory).
Prints each trial's exit statuses, the error line of a failed stop, and the totals per tree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from childtrials import alternate, run_child

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, random, signal, sys, time
from pathlib import Path
import trio
from meshd.api.client import Client
from tests.integration.daemons import DaemonProcess, pair, wait_connected

root = Path(sys.argv[1])
lines = "".join(json.dumps({"body": f"entry {i} " + "x" * 200}) + "\n" for i in range(4000)).encode()

async def main():
    alpha = DaemonProcess(root, "alpha", discovery=False)
    beta = DaemonProcess(root, "beta", discovery=False)
    try:
        await alpha.start()
        await beta.start()
        await pair(alpha, beta, address="127.0.0.1")
        await wait_connected(beta, 1)
        client = Client(alpha.socket_path)
        for _ in range(5):
            await trio.to_thread.run_sync(lambda: client.write_batch(lines, stream="s"))
        await trio.sleep(random.uniform(0, 0.3))
        offset = random.uniform(0, 0.03)
        alpha.process.send_signal(signal.SIGTERM)
        time.sleep(offset)
        beta.process.send_signal(signal.SIGTERM)
        statuses = [await trio.to_thread.run_sync(d.process.wait, 10) for d in (alpha, beta)]
        print(json.dumps({"offset_ms": round(offset * 1000, 1), "alpha": statuses[0],
                          "beta": statuses[1]}))
        for daemon, status in zip((alpha, beta), statuses):
            if status:
                errors = [line for line in daemon.log().splitlines()
                          if "Error" in line or "error" in line][-3:]
                print(json.dumps({"failed": daemon.name, "lines": errors}))
    finally:
        alpha.kill()
        beta.kill()

trio.run(main)
"""


def trial(tree: Path) -> tuple[int, str]:
    """Non-zero exits in one trial on tree, and what it printed."""
    status, out = run_child(tree, CHILD, "stop-race-")
    return out.count('"failed"') + (status != 0), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--main", type=Path, help="a tree of main (default: git archive main)")
    parser.add_argument("--trials", type=int, default=30, help="trials per tree")
    parser.add_argument("--minutes", type=float, default=10.0, help="stop starting trials after this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stop-race-main-") as scratch:
        main_tree = args.main
        if main_tree is None:
            main_tree = Path(scratch)
            archive = subprocess.run(["git", "archive", "main"], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(main_tree)], input=archive.stdout, check=True)
        trees = {"this tree": ROOT, "main": main_tree}
        failed, trials = alternate(trees, trial, args.trials, args.minutes)
        load = os.getloadavg()
        for name in trees:
            print(f"{name}: {failed[name]} non-zero exits in {trials[name]} trials "
                  f"(2 daemons each)")
        print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
