"""`make soak` (as root): partitions of 30, 60 and 120 s between two namespace hosts, both
writing about 50 entries/s, by cutting the link and by a silent drop that keeps it up; prints
per run what was acknowledged and lost, when each side reported the peer gone, and the time
to converge after the heal (tests/netns/partition.py; the 60 s link cut runs in make test).

    python soak/partition.py [--seconds 30 60 120] [--modes link drop] [--hosts 2 3] [--runs N]
                             [--out bench/results/partition-DATE.txt] [--until HH:MM]
    python soak/partition.py --summarize bench/results/partition-DATE.txt

With --runs N every scenario runs N times, round-robin (one run of each scenario, then the
next round), so a run stopped early (--until, UTC) has spread its runs evenly. Each run
creates and deletes its own namespaces. --out appends one line per run (key=value fields);
--summarize prints, per scenario, the runs, lost, and min/median/max convergence and
peer-gone times.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.netns.netns import available  # noqa: E402
from tests.netns.partition import PartitionOutcome, partition  # noqa: E402

CONVERGE_LIMIT_S = 10.0  # the bound after the heal
GONE_LIMIT_S = 45.0  # a silent peer is reported gone within this of the cut (peers.md)


def _failed(outcome: PartitionOutcome) -> bool:
    # A partition longer than the dead-peer limit must be noticed on both sides, in time.
    late = outcome.seconds > GONE_LIMIT_S and (
        len(outcome.down_after) < outcome.hosts
        or max(outcome.down_after.values()) > GONE_LIMIT_S)
    unsettled = outcome.settled_s == float("inf")  # never both connected for STEADY_S
    return bool(outcome.lost or outcome.converge_s > CONVERGE_LIMIT_S or late or unsettled)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _record(outcome: PartitionOutcome, commit: str) -> str:
    stamp = _now()
    gone = ",".join(f"{name}:{after:.1f}" for name, after in sorted(outcome.down_after.items()))
    return (f"{stamp} commit={commit} mode={outcome.mode} seconds={outcome.seconds:.0f} "
            f"hosts={outcome.hosts} "
            f"acknowledged={outcome.acknowledged} lost={outcome.lost} "
            f"converge_s={outcome.converge_s:.1f} settled_s={outcome.settled_s:.1f} "
            f"gone_s={gone or 'never'} "
            f"ok={int(not _failed(outcome))}")


def _commit() -> str:
    here = Path(__file__).resolve().parent.parent
    stamp = here / "COMMIT"  # a snapshot (git archive) carries its commit in this file
    if stamp.exists():
        return stamp.read_text().strip()[:12]
    done = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


async def main(seconds: list[float], modes: list[str], hosts: list[int], runs: int,
               out: Path | None, until: datetime.datetime | None) -> int:
    ok, why = available()
    if not ok:
        print(f"partition soak skipped: {why}")
        return 0
    commit = _commit()
    failures = 0
    scenarios = [(n, mode, duration) for n in hosts for mode in modes for duration in seconds]
    for _ in range(runs):
        for n, mode, duration in scenarios:
            if until is not None and datetime.datetime.now(datetime.UTC) >= until:
                print("stopped: --until reached", flush=True)
                return 1 if failures else 0
            try:
                with tempfile.TemporaryDirectory(prefix="meshd-soak-") as root:
                    outcome = await partition(Path(root), duration, mode, hosts=n)
            except Exception as err:  # noqa: BLE001 - a harness failure is a failed run, reported
                line = (f"{_now()} commit={commit} mode={mode} seconds={duration:.0f} hosts={n} "
                        f"error={type(err).__name__} ok=0")
                print(f"partition {duration:.0f} s ({mode}, {n} hosts): run failed: {err!r}",
                      flush=True)
                failures += 1
            else:
                print(outcome.line(), flush=True)
                line = _record(outcome, commit)
                failures += _failed(outcome)
            if out is not None:
                with out.open("a") as file:
                    file.write(line + "\n")
    return 1 if failures else 0


def summarize(path: Path) -> None:
    """Per scenario (and commit): runs, failures, lost, and the spread of the timings."""
    groups: dict[tuple[str, int, str, int], list[dict[str, str]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        key = (fields["commit"], int(fields.get("hosts", 2)), fields["mode"], int(fields["seconds"]))
        groups[key].append(fields)

    def spread(values: list[float]) -> str:
        if not values:
            return "-"
        return f"{min(values):.1f}/{statistics.median(values):.1f}/{max(values):.1f}"

    print("commit        hosts  mode  s    runs  ok  lost(sum,max)  converge s min/med/max  "
          "gone s min/med/max  settled s min/med/max")
    for (commit, n, mode, secs), all_rows in sorted(groups.items()):
        rows = [r for r in all_rows if "error" not in r]
        if len(rows) < len(all_rows):
            print(f"{commit:12}  {n:5d}  {mode:4}  {secs:3d}  {len(all_rows) - len(rows)} run(s) failed "
                  f"in the harness: {sorted({r['error'] for r in all_rows if 'error' in r})}")
        if not rows:
            continue
        converge = [float(r["converge_s"]) for r in rows]
        gone = [float(g.split(":")[1]) for r in rows if r["gone_s"] != "never"
                for g in r["gone_s"].split(",")]
        lost = [int(r["lost"]) for r in rows]
        settled = [float(r["settled_s"]) for r in rows if "settled_s" in r]
        print(f"{commit:12}  {n:5d}  {mode:4}  {secs:3d}  {len(rows):4d}  "
              f"{sum(int(r['ok']) for r in rows):2d}  {sum(lost):5d},{max(lost):<5d}  "
              f"{spread(converge):>22}  {spread(gone):>18}  {spread(settled):>21}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[30.0, 60.0, 120.0])
    parser.add_argument("--modes", nargs="+", choices=["link", "drop"], default=["link", "drop"])
    parser.add_argument("--hosts", type=int, nargs="+", choices=[2, 3], default=[2, 3])
    parser.add_argument("--runs", type=int, default=1, help="rounds over every scenario")
    parser.add_argument("--out", type=Path, help="append one line per run to this file")
    parser.add_argument("--until", help="UTC HH:MM: start no run after this")
    parser.add_argument("--summarize", type=Path, help="summarise a file written by --out")
    args = parser.parse_args()
    # Started in the background (nohup ... &), SIGINT arrives ignored: take it back, so that
    # kill -INT stops a soak cleanly (its daemons ended, its namespaces deleted).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.summarize:
        summarize(args.summarize)
        sys.exit(0)
    until = None
    if args.until:
        hours, minutes = map(int, args.until.split(":"))
        until = datetime.datetime.now(datetime.UTC).replace(hour=hours, minute=minutes,
                                                            second=0, microsecond=0)
    sys.exit(trio.run(main, args.seconds, args.modes, args.hosts, args.runs, args.out, until))
