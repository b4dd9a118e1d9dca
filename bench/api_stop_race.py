"""A daemon SIGTERMed while API clients write pipelined batches, stream events and hang up
mid-request: how often it exits non-zero, or logs a bug (review s8, gap 1).

Each trial starts a fresh daemon (no mDNS), then in threads: 3 writers importing 4,000-line
batches pipelined on one connection each (Client.import_lines: the server reads the next
batch ahead while one commits), 2 event streams, and a client that sends half a pipelined
batch and closes, over and over. SIGTERM goes 50-400 ms after the writers start. A trial
fails when the daemon exits non-zero or its log holds "a bug in meshd". The trees are run
alternately, trial by trial, in the same run:

    python bench/api_stop_race.py [--main DIR] [--trials 20] [--minutes 10]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from childtrials import alternate, run_child

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, random, signal, socket, sys, threading, time
from pathlib import Path
import trio
from meshd.api.client import Client, ClientError
from tests.integration.daemons import DaemonProcess

root = Path(sys.argv[1])
lines = [json.dumps({"body": f"entry {i} " + "x" * 100}).encode() for i in range(4000)]
stop = threading.Event()

def writer(path):
    while not stop.is_set():
        try:
            Client(path).import_lines(lines * 3, stream="s", request_bytes=200_000)
        except (ClientError, OSError):
            return

def watcher(path):
    try:
        for _ in Client(path).events():
            if stop.is_set():
                return
    except (ClientError, OSError):
        return

def hang_up(path):
    body = b"".join(line + b"\n" for line in lines[:500])
    head = (f"POST /v1/batch?stream=s HTTP/1.1\r\nhost: meshd\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    while not stop.is_set():
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                sock.sendall(head + body + head + body[: len(body) // 2])
                time.sleep(random.uniform(0, 0.01))
        except OSError:
            return

async def main():
    daemon = DaemonProcess(root, "alpha", discovery=False)
    try:
        await daemon.start()
        threads = [threading.Thread(target=f, args=(daemon.socket_path,), daemon=True)
                   for f in (writer, writer, writer, watcher, watcher, hang_up)]
        for thread in threads:
            thread.start()
        offset = random.uniform(0.05, 0.4)
        time.sleep(offset)
        daemon.process.send_signal(signal.SIGTERM)
        status = await trio.to_thread.run_sync(daemon.process.wait, 15)
        stop.set()
        bugs = daemon.log().count("a bug in meshd")
        import sqlite3
        with sqlite3.connect(daemon.state_dir / "meshd.db") as db:
            entries = db.execute("SELECT count(*) FROM entries").fetchone()[0]
        print(json.dumps({"offset_ms": round(offset * 1000, 1), "status": status, "bugs": bugs,
                          "entries": entries}))
        if status or bugs:
            lines_ = [l for l in daemon.log().splitlines() if "rror" in l or "bug" in l][-4:]
            print(json.dumps({"failed": True, "lines": lines_}))
    finally:
        stop.set()
        daemon.kill()

trio.run(main)
"""


def trial(tree: Path) -> tuple[int, str]:
    status, out = run_child(tree, CHILD, "api-stop-")
    return int('"failed"' in out or status != 0), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--main", type=Path, required=True, help="a tree of main")
    parser.add_argument("--trials", type=int, default=20, help="trials per tree")
    parser.add_argument("--minutes", type=float, default=10.0, help="stop starting trials after this")
    args = parser.parse_args()
    trees = {"this tree": ROOT, "main": args.main}
    failed, trials = alternate(trees, trial, args.trials, args.minutes)
    load = os.getloadavg()
    for name in trees:
        print(f"{name}: {failed[name]} failed stops in {trials[name]} trials")
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
