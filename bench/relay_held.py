"""What the relay holds between requests after sending large answers (issue 20).

In the 30-minute soak the relay's RSS rose in steps of about 4 MB, all of it glibc mmap'd
chunks alive between samples. Cause: the msgpack Packer each connection's channel reused grows
its buffer to 1-2x the largest message it packed and never shrinks it, so every long-lived
connection kept a buffer sized by the largest answer it ever got (a 4 MiB fetch page, a
manifest, a segment), and those answers grow with the log.

Here a relay process (`meshd relay`, memory.configure() as in production) serves three
long-lived sessions, as in the soak (A and B always connected, C fetching its mailbox); each
round every session gets back larger blobs (segments of 256 KiB .. 4 MiB, the backup blob) and
C fetches a full page of envelopes (MAX_FETCH_BYTES). The relay's RSS is read between rounds,
with the sessions still open and idle. Each tree (this one, and a baseline tree such as
`git archive main`) runs in turn, alternating, in the same run.

Run: .venv/bin/python bench/relay_held.py [--baseline /tmp/base] [--rounds 5] [--repeat 2]
(results: bench/results/issue20-relay-rss-s6-2026-12-03.txt)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.protocol.circle import Circle  # noqa: E402
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair  # noqa: E402
from meshd.protocol.records import DeviceInfo  # noqa: E402
from meshd.protocol.relaycodes import MAILBOX_ID_BYTES, MAX_FETCH_BYTES  # noqa: E402
from meshd.relay.session import open_relay_session  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
SEGMENT_SIZES = [256 * KiB, 512 * KiB, MiB, 2 * MiB, 4 * MiB]
ENVELOPE_BYTES = 2000
MEMTRACE = Path(__file__).resolve().parent / "memtrace"
SAMPLE_S = 0.5  # the relay's memtrace line (bench/memtrace/sitecustomize.py) every this long


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_relay(tree: Path, state_dir: str, trace_dir: str) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, PYTHONPATH=f"{tree}:{MEMTRACE}", MESHD_MEMTRACE_DIR=trace_dir,
               MESHD_MEMTRACE_S=str(SAMPLE_S), MESHD_MEMTRACE_BASE_S="5",
               MESHD_MEMTRACE_PYTHON=os.environ.get("MESHD_MEMTRACE_PYTHON", "0"))
    process = subprocess.Popen(
        [sys.executable, "-m", "meshd", "relay", "--state-dir", state_dir,
         "--listen", "127.0.0.1:0", "--rate", "1e9", "--burst", "1e9",
         "--quota-bytes", str(2**40), "--log-level", "warning",
         "--max-connections-per-source", "1000000"],
        stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def circle_of_three() -> tuple[list[bytes], list[DHKeyPair]]:
    keys = [(SigningKeyPair(os.urandom(32)), DHKeyPair.generate(os.urandom)) for _ in range(3)]
    infos = [DeviceInfo(bytes(s.public), bytes(d.public), f"dev{i}").claimed(s)
             for i, (s, d) in enumerate(keys)]
    circle = Circle.create(keys[0][0], infos[0], os.urandom)
    for info in infos[1:]:
        circle.add_device(keys[0][0], info, os.urandom)
    return circle.records(), [d for _, d in keys]


Sample = dict[str, float]  # rss, mmap (glibc mmap'd chunks alive), in_use, free (arenas), sqlite


def sample(trace_file: Path) -> Sample:
    """The relay's newest memtrace line, once one written after this call exists."""
    lines = trace_file.read_text().splitlines() if trace_file.exists() else []
    seen = len(lines)
    while len(lines) <= seen or not lines[-1].startswith("== "):
        time.sleep(SAMPLE_S / 4)
        lines = trace_file.read_text().splitlines()
    fields = dict(re.findall(r"(\w+)=([\d.]+)MB", lines[-1]))
    return {k: float(fields[n]) for k, n in (("rss", "rss"), ("mmap", "mmap"), ("in_use", "in_use"),
                                             ("free", "free"), ("sqlite", "sqlite_used"))}


async def scenario(address: str, trace_file: Path, rounds: int) -> list[Sample]:
    """The relay's memory: before the sessions, after they opened, after each round."""
    records, dhs = circle_of_three()
    figures = [await trio.to_thread.run_sync(sample, trace_file)]
    mailbox = os.urandom(MAILBOX_ID_BYTES)
    async with open_relay_session(address, dhs[0], records) as a, \
            open_relay_session(address, dhs[1], records) as b, \
            open_relay_session(address, dhs[2], records) as c:
        await a.segment_put(os.urandom(16), b"x" * 1000)
        await c.fetch(mailbox)
        figures.append(await trio.to_thread.run_sync(sample, trace_file))
        version = 0
        for _ in range(rounds):
            for size in SEGMENT_SIZES:
                segment_id = os.urandom(16)
                await a.segment_put(segment_id, os.urandom(size))
                for session in (a, b, c):  # a manifest's index blobs, read by every device
                    assert await session.segment_get(segment_id) is not None
            await a.backup_put(version, version + 1, os.urandom(SEGMENT_SIZES[-1]))
            version += 1
            for session in (a, b):
                assert await session.backup_get() is not None
            # C was away: a full page of envelopes waits in its mailbox.
            for _ in range(MAX_FETCH_BYTES // ENVELOPE_BYTES + 1):
                await a.deposit(mailbox, os.urandom(ENVELOPE_BYTES))
            page = await c.fetch(mailbox)
            await c.ack(mailbox, page.items[-1][0])
            # Everything answered: the next sample shows what the relay holds between requests.
            figures.append(await trio.to_thread.run_sync(sample, trace_file))
    return figures


def run_once(tree: Path, rounds: int) -> list[Sample]:
    with tempfile.TemporaryDirectory(prefix="relay-held-") as state, \
            tempfile.TemporaryDirectory(prefix="relay-held-trace-") as traces:
        process, address = start_relay(tree, state, traces)
        try:
            return trio.run(scenario, address, Path(traces) / f"{process.pid}.txt", rounds)
        finally:
            process.terminate()
            process.wait(10)
            for trace in Path(traces).glob("*.txt"):
                if os.environ.get("MESHD_MEMTRACE_PYTHON") == "1":
                    print(trace.read_text().split("\n== ")[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a tree to compare with, e.g. git archive main")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    print(f"load {os.getloadavg()[0]:.2f}; the relay's memory in MB (memtrace): before the sessions, "
          f"the sessions open, after each of {args.rounds} rounds (segments "
          f"{[s // KiB for s in SEGMENT_SIZES]} KiB read by 3 sessions, a "
          f"{SEGMENT_SIZES[-1] // KiB} KiB backup read by 2, a {MAX_FETCH_BYTES // MiB} MiB fetch page)")
    for n in range(args.repeat):
        trees = ([("baseline", args.baseline)] if args.baseline else []) + [("this tree", here)]
        for name, tree in trees:
            figures = run_once(tree, args.rounds)
            for key in ("rss", "mmap", "free", "in_use", "sqlite"):
                values = [f[key] for f in figures]
                print(f"  run {n + 1} {name:9s} {key:6s}: " + " ".join(f"{v:5.1f}" for v in values)
                      + f"  | held after the rounds {values[-1] - values[1]:+5.1f}, over the last "
                      f"{args.rounds - 1} rounds {values[-1] - values[2]:+5.1f}", flush=True)


if __name__ == "__main__":
    main()
