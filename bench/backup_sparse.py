"""Backup bytes at sparse write rates, with the real upload code: one entry per upload.

At 1,000 entries a day for a circle (two writers, a 20 s batching window), entries are about
three minutes apart per writer, so every upload carries one entry. This drives meshd/backup.py
(sealing, planning, compaction, the manifest) against an in-memory relay that counts the
bytes stored: a writer of a three-device circle writes --entries entries of 200-2,000 body
bytes (as in the soak), one upload each (a week at 1,000 a day is 3,500 per writer), and the
bytes stored per body byte are printed per --day entries and in all. No clock is involved:
the figures depend on the code only (not on the machine's load). Run it with PYTHONPATH at a
tree (for example a `git archive main`) to compare trees in the same session:

    PYTHONPATH=. python bench/backup_sparse.py --entries 3500 --day 500

Deletes are not modelled (the soak's 40 a minute rebuild small segments: see bench/soak.py).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.api.events import EventBus  # noqa: E402
from meshd.api.metrics import MeshdMetrics  # noqa: E402
from meshd.backup import Backups  # noqa: E402
from meshd.identity import DeviceIdentity  # noqa: E402
from meshd.net.logsync import LogService  # noqa: E402
from meshd.protocol.circle import Circle  # noqa: E402
from meshd.protocol.crypto import RandomSource  # noqa: E402
from meshd.protocol.relay import CONFLICT, RelayError  # noqa: E402
from meshd.relay.session import StoredBackup  # noqa: E402
from meshd.store.db import Store  # noqa: E402
from tests.shell.test_relay import make_circle  # noqa: E402

ADDRESS = "127.0.0.1:1#relay"


@dataclass
class Host:
    circle: Circle
    identity: DeviceIdentity
    store: Store
    logs: LogService
    rng: RandomSource
    events: EventBus = field(default_factory=EventBus)
    metrics: MeshdMetrics = field(default_factory=MeshdMetrics)


class CountingRelay:
    """A relay's backup requests in memory, counting what is stored."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.stored: StoredBackup | None = None
        self.blob_bytes = 0  # segments (and, chained, index and chain blobs)
        self.signed_bytes = 0  # the signed backup blobs
        self.registration = None  # no relay.segment_list (a sweep every 6 h is no cost here)

    @property
    def session(self) -> CountingRelay:
        return self

    async def backup_get(self) -> StoredBackup | None:
        return self.stored

    async def backup_put(self, expected: int, version: int, blob: bytes) -> None:
        if (self.stored.version if self.stored else 0) != expected:
            raise RelayError(CONFLICT)
        self.stored = StoredBackup(version, blob)
        self.signed_bytes += len(blob)

    async def segment_put(self, segment_id: bytes, blob: bytes) -> None:
        self.blobs[segment_id] = blob
        self.blob_bytes += len(blob)

    async def segment_get(self, segment_id: bytes) -> bytes | None:
        return self.blobs.get(segment_id)

    async def segment_delete(self, ids: list[bytes]) -> None:
        for blob_id in ids:
            self.blobs.pop(blob_id, None)


async def run(entries: int, day: int, seed: int) -> None:
    circle, members, rng = make_circle("alice", "bob", "carol")
    alice = members["alice"]
    sizes = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="meshd-backup-sparse-") as root:
        store = Store(Path(root) / "meshd.db")
        logs = LogService(store, alice.signer, lambda: int(time.time() * 1000))
        host = Host(circle, DeviceIdentity(alice.signer, alice.dh), store, logs, rng)
        relay = CountingRelay()
        backups = Backups(host, lambda *_: None)
        print(f"{'entries':>8} {'body MB':>8} {'blobs MB':>9} {'signed MB':>10} {'ratio':>6}"
              f" {'day ratio':>9} {'signed B/upload':>15} {'at relay MB':>11}")
        body = blobs = signed = 0
        last = (0, 0, 0, 0)
        for i in range(1, entries + 1):
            size = sizes.randint(200, 2000)
            logs.write_many_nowait([("notes", f"note-{i:07d}", sizes.randbytes(size))])
            body += size
            if not await backups.upload(ADDRESS, relay):  # type: ignore[arg-type]
                raise SystemExit(f"upload {i} failed: {backups.describe(ADDRESS)['error']}")
            blobs, signed = relay.blob_bytes, relay.signed_bytes
            if i % day == 0 or i == entries:
                d_body, d_stored = body - last[0], blobs + signed - last[1]
                at_relay = sum(map(len, relay.blobs.values())) + len(relay.stored.blob if relay.stored else b"")
                print(f"{i:8,} {body / 1e6:8.2f} {blobs / 1e6:9.2f} {signed / 1e6:10.2f}"
                      f" {(blobs + signed) / body:6.2f} {d_stored / d_body:9.2f}"
                      f" {(signed - last[2]) / (i - last[3]):15.0f} {at_relay / 1e6:11.2f}")
                last = (body, blobs + signed, signed, i)
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=3500, help="entries written, one upload each")
    parser.add_argument("--day", type=int, default=500, help="entries per printed row (a writer's day)")
    parser.add_argument("--seed", type=int, default=20)
    args = parser.parse_args()
    trio.run(run, args.entries, args.day, args.seed)


if __name__ == "__main__":
    main()
