"""Idle memory of a daemon holding a large log (default 1,000,000 entries) beside an empty one.

Issue 20's third target: the resident memory of an idle daemon with 1,000,000 entries stays
near that of an empty one. This builds the large store quickly (the daemon's own identity,
signed batches written straight into its SQLite file with LogService.write_many_nowait, the
daemon stopped meanwhile), then starts, in the same run, the daemon on it and a daemon on an
empty store, and samples each one's RSS from readiness to --minutes (no peers, no relay,
no discovery: idle). With --baseline-tree DIR it also starts the code in DIR (for example
`git archive` of the old main) on copies of both stores, so the fix is compared with the
old code on the same machine at the same moment.

Run: .venv/bin/python bench/idle_large.py [--entries 1000000] [--minutes 5] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.identity import load_or_create_identity  # noqa: E402
from meshd.net.logsync import LogService  # noqa: E402
from meshd.store.db import Store  # noqa: E402
from tests.integration.daemons import DaemonProcess  # noqa: E402

SAMPLE_S = 30.0
STREAMS = 4
BODY_BYTES = 200


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fill(state_dir: Path, entries: int) -> float:
    """Write `entries` puts by the daemon's own author; returns the seconds it took."""
    identity = load_or_create_identity(state_dir)
    store = Store(state_dir / "meshd.db")
    began = time.perf_counter()
    try:
        logs = LogService(store, identity.signing, lambda: int(time.time() * 1000))
        body = b"b" * BODY_BYTES
        logs.write_many_nowait(((f"s{i % STREAMS}", f"r{i}", body) for i in range(entries)),
                               chunk_entries=20_000)
    finally:
        store.close()
    return time.perf_counter() - began


async def main(entries: int, minutes: float, baseline_tree: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="meshd-idle-") as tmp:
        root = Path(tmp)
        big = DaemonProcess(root, "large", discovery=False)
        empty = DaemonProcess(root, "empty", discovery=False)
        await big.start()  # identity and circle, then stopped while the log is written
        await big.stop()
        seconds = fill(big.state_dir, entries)
        size = sum(p.stat().st_size for p in big.state_dir.glob("meshd.db*")) / 2**20
        print(f"{entries:,} entries written in {seconds:.0f} s ({entries / seconds:,.0f}/s); "
              f"database {size:.0f} MB")
        daemons = {"empty (this tree)": empty, f"{entries:,} (this tree)": big}
        if baseline_tree is not None:
            launcher = ["env", f"PYTHONPATH={baseline_tree}", sys.executable, "-m", "meshd"]
            await empty.start()
            await empty.stop()
            for name, source in (("empty", empty), ("large", big)):
                copy = DaemonProcess(root, f"{name}-baseline", discovery=False, launcher=launcher)
                shutil.copytree(source.state_dir, copy.state_dir, dirs_exist_ok=True)
                label = f"{entries:,}" if name == "large" else "empty"
                daemons[f"{label} (baseline)"] = copy
        try:
            for daemon in daemons.values():
                await daemon.start()
            started = time.monotonic()
            rows: list[tuple[float, list[float]]] = []
            while True:
                t = time.monotonic() - started
                rows.append((t, [rss_mb(d.process.pid) for d in daemons.values() if d.process]))
                if t >= minutes * 60:
                    break
                await trio.sleep(min(SAMPLE_S, minutes * 60 - t) or SAMPLE_S)  # sampling period
            for daemon in daemons.values():
                status = await daemon.status()
                print(f"  {daemon.name}: {status['entries']:,} entries")
        finally:
            for daemon in daemons.values():
                daemon.kill()
    names = list(daemons)
    print(f"\nRSS MB from readiness (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"{'t s':>6} " + " ".join(f"{n:>24}" for n in names))
    for t, values in rows:
        print(f"{t:6.0f} " + " ".join(f"{v:24.1f}" for v in values))
    first, last = rows[0][1], rows[-1][1]
    print("\nlarge minus empty, at readiness and at the end:")
    for i in range(0, len(names), 2):
        print(f"  {names[i + 1]}: {first[i + 1] - first[i]:+.1f} MB, {last[i + 1] - last[i]:+.1f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--baseline-tree", type=Path)
    args = parser.parse_args()
    trio.run(main, args.entries, args.minutes, args.baseline_tree)
