"""CPU per request of the local API layer alone (HTTP, routing, JSON), this tree against another.

bench/api_write.py measures writes through a whole daemon: its figures carry the store, the
disk and, on a shared machine, the load. This bench keeps only the API: a server process
runs meshd.api.routes.serve_api of a tree over a unix socket with a stand-in daemon whose
write answers after one trio schedule point (as a group commit does, without SQLite), and
this process drives it with W keep-alive writers posting one record per request, as figure 2
of api_write.py does. The figure is the server process's CPU time (user + system, from
/proc) per request, which other load inflates far less than wall time; the two trees run
alternately, R rounds each, and the medians and their ratio are printed.

Run: .venv/bin/python bench/api_layer.py [--baseline-tree PATH] [--writers 16] [--requests 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent.parent

SERVER = r"""
import sys, trio
from functools import partial
sys.path.insert(0, sys.argv[1])
from meshd.api.events import EventBus
from meshd.api.routes import open_unix_listener, serve_api

class Control:
    events = EventBus()
    def require_member(self): return None
    async def write(self, stream, record_id, body):
        await trio.lowlevel.checkpoint()  # a group commit's wait, without the store
        return {"id": record_id or "0000018c2f3a1b2c.a1b2c3d4e5f6", "stream": stream, "seq": 1}

async def main():
    listener = await open_unix_listener(sys.argv[2])
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_api, Control(), listener, allowed_uids=set()))
        print("ready", flush=True)
        await trio.sleep_forever()
trio.run(main)
"""

BODY = b'{"body": "' + b"x" * 200 + b'"}'


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def writer(path: str, stream: str, count: int) -> None:
    request = (f"POST /v1/streams/{stream}/records HTTP/1.1\r\nhost: meshd\r\n"
               f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\n\r\n").encode() + BODY
    async with await trio.open_unix_socket(path) as sock:
        buffer = b""
        for _ in range(count):
            await sock.send_all(request)
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end >= 0:
                    head = buffer[:end].lower()
                    length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                    if len(buffer) >= end + 4 + length:
                        assert head.startswith(b"http/1.1 201"), head
                        buffer = buffer[end + 4 + length:]
                        break
                buffer += await sock.receive_some(65536)


def one_round(tree: Path, writers: int, requests: int) -> tuple[float, float]:
    """(server CPU microseconds per request, requests/s) for the tree's API."""
    with tempfile.TemporaryDirectory(prefix="meshd-api-layer-", dir="/tmp") as directory:
        path = str(Path(directory) / "api.sock")
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(tree), path],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            per_writer = max(1, requests // writers)
            trio.run(writer, path, "warm", 50)
            cpu, started = cpu_seconds(server.pid), time.perf_counter()

            async def run_all() -> None:
                async with trio.open_nursery() as nursery:
                    for n in range(writers):
                        nursery.start_soon(writer, path, f"w{n}", per_writer)
            trio.run(run_all)
            elapsed, cpu = time.perf_counter() - started, cpu_seconds(server.pid) - cpu
        finally:
            server.kill()
            server.wait()
    total = per_writer * writers
    return cpu * 1e6 / total, total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-tree", type=Path, default=None)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8000, help="requests per round, over all writers")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trees = {"this tree": HERE}
    if args.baseline_tree is not None:
        trees["baseline"] = args.baseline_tree.resolve()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    print(f"{args.writers} writers, {args.requests} requests per round, {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.1f}")
    for _ in range(args.rounds):
        for name, tree in trees.items():
            results[name].append(one_round(tree, args.writers, args.requests))
            cpu, rate = results[name][-1]
            print(f"  {name}: {cpu:.1f} us of server CPU per request, {rate:,.0f} requests/s")
    medians = {name: statistics.median(cpu for cpu, _ in rounds) for name, rounds in results.items()}
    for name, value in medians.items():
        print(f"{name}: median {value:.1f} us of server CPU per request")
    if "baseline" in medians and medians["baseline"] > 0:
        print(f"ratio: this tree uses {medians['this tree'] / medians['baseline']:.0%} of the baseline's "
              f"CPU per request (load {os.getloadavg()[0]:.1f})")
    elif "baseline" in medians:  # a tiny run: less CPU than one tick of /proc's clock
        print("ratio: none (the baseline's CPU was below the clock's resolution: run more requests)")


if __name__ == "__main__":
    main()
