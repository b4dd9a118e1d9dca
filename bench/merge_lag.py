"""A member sends a daemon a large batch of new circle records: does its event loop stall?

A real CircleService (SQLite store, identity) merges N new valid records (epoch rotations
signed by a member of the circle: all a hostile member pays for are signatures) while a
probe task on the same trio loop sleeps 1 ms at a time and records how late it wakes: the
event-loop lag every connection and API request of the daemon would see. Two modes, same
run, same records, fresh state and an empty verification cache for each:

  inline    the merge on the trio thread (the code before this change: the baseline)
  off-loop  CircleService.merge: verified in a worker thread, applied on the loop

Figures: the probe's max and p99 lag during the merge, and the time until the merge applied.

Run: .venv/bin/python bench/merge_lag.py [--records N] [--rounds R]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd import circleservice  # noqa: E402
from meshd.api.events import EventBus  # noqa: E402
from meshd.circleservice import CircleService  # noqa: E402
from meshd.identity import load_or_create_identity  # noqa: E402
from meshd.protocol import circle as circle_module  # noqa: E402
from meshd.protocol import records as records_module  # noqa: E402
from meshd.protocol.circle import Circle  # noqa: E402
from meshd.protocol.records import DeviceInfo  # noqa: E402
from meshd.store.db import Store  # noqa: E402

PROBE_S = 0.001


def open_service(state: Path) -> tuple[CircleService, Store]:
    identity = load_or_create_identity(state, random.Random(1).randbytes)
    store = Store(state / "meshd.db")
    me = DeviceInfo(identity.signing.public, identity.noise.public, "laptop").claimed(identity.signing)
    return CircleService(store, identity, lambda: me, random.Random(2).randbytes, EventBus(),
                         lambda kind: None), store


def prepare(root: Path, records: int) -> tuple[Path, list[bytes]]:
    """A saved daemon state, and a batch of `records` new records for its circle."""
    state = root / "template"
    state.mkdir()
    service, store = open_service(state)
    identity = load_or_create_identity(state)
    copy = Circle.from_records(service.circle.records())
    rng = random.Random(3).randbytes
    for _ in range(records):
        copy.rotate_epoch(identity.signing, rng)
    store.close()
    return state, copy.records()


async def one_run(template: Path, root: Path, batch: list[bytes], mode: str) -> dict[str, float]:
    state = root / f"{mode}-{time.monotonic_ns()}"
    shutil.copytree(template, state)
    # Every run checks every signature of the batch: nothing of it decoded or validated yet
    # (the daemon's own circle is, as after its start-up).
    circle_module._validated.clear()  # noqa: SLF001
    records_module._decoded.clear()  # noqa: SLF001
    service, store = open_service(state)
    lags: list[float] = []
    done = trio.Event()
    service.subscribe(lambda before, after, source: done.set())

    async def probe() -> None:
        while True:
            asked = trio.current_time()
            await trio.sleep(PROBE_S)
            lags.append(trio.current_time() - asked - PROBE_S)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        await trio.sleep(0.05)  # the probe's own baseline lags first
        lags.clear()
        started = trio.current_time()
        if mode == "inline":
            service._merge_now(batch, "bench")  # noqa: SLF001 - the old path, on the loop
        else:
            service.merge(batch, source="bench")
        await done.wait()
        applied = trio.current_time() - started
        await service.wait_settled()  # saved (in a thread): the probe runs on meanwhile
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    store.close()
    assert len(service.circle.records()) >= len(batch)
    ordered = sorted(lags)
    return {"max_ms": ordered[-1] * 1000, "p99_ms": ordered[int(len(ordered) * 0.99)] * 1000,
            "applied_s": applied, "probes": len(ordered)}


async def main_async(records: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.monotonic()
        template, batch = prepare(root, records)
        print(f"{len(batch)} records in the batch ({sum(map(len, batch)):,} bytes), "
              f"made in {time.monotonic() - started:.1f} s; OFFLOOP_RECORDS="
              f"{circleservice.OFFLOOP_RECORDS}", flush=True)
        results: dict[str, list[dict[str, float]]] = {"inline": [], "off-loop": []}
        for _ in range(rounds):  # alternating, so load on the machine hits both alike
            for mode in results:
                results[mode].append(await one_run(template, root, batch, mode))
        for mode, runs in results.items():
            each = ", ".join(f"{r['max_ms']:.1f}" for r in runs)
            print(f"{mode:8}  max lag median {statistics.median(r['max_ms'] for r in runs):8.1f} ms"
                  f"  (runs: {each})"
                  f"  p99 lag median {statistics.median(r['p99_ms'] for r in runs):7.1f} ms"
                  f"  applied in median {statistics.median(r['applied_s'] for r in runs):.2f} s",
                  flush=True)
        inline = statistics.median(r["max_ms"] for r in results["inline"])
        offloop = statistics.median(r["max_ms"] for r in results["off-loop"])
        print(f"max lag off-loop / inline: {offloop / inline:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trio.run(main_async, args.records, args.rounds)


if __name__ == "__main__":
    main()
