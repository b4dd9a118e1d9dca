"""The backup loop's count of the bytes waiting (meshd/relay/backuploop.py): own entries the
relays' manifests do not cover, read from the store once each and only up to what the window
asks for."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from meshd.relay.backuploop import BackupLoop

OWN = bytes(range(32))
HEADER, BODY = 100, 1000  # bytes of each fake entry


@dataclass
class FakeLogs:
    tip: int = 0
    reads: list[tuple[int, int]] = field(default_factory=list)  # (after, through) of each read

    def version_vector(self) -> dict[bytes, int]:
        return {OWN: self.tip}

    def batch_since(self, author: bytes, after: int, max_bytes: int) -> dict[str, Any] | None:
        assert author == OWN
        if after >= self.tip:
            return None
        through = min(self.tip, after + max(1, -(-max_bytes // (HEADER + BODY))))
        self.reads.append((after, through))
        n = through - after
        return {"headers": [b"h" * HEADER] * n, "bodies": [b"b" * BODY] * n, "head": {"seq": through}}


@dataclass(frozen=True)
class FakeManifest:
    through: int
    threads: list[int] = field(default_factory=list, compare=False)  # where covered() ran

    def covered(self, author: bytes) -> int:
        assert author == OWN
        self.threads.append(threading.get_ident())
        return self.through


def loop_with(logs: FakeLogs, manifest: FakeManifest | None) -> tuple[BackupLoop, SimpleNamespace]:
    state = SimpleNamespace(manifest=manifest, manifest_bytes=0)
    daemon = SimpleNamespace(config=SimpleNamespace(backup_window=20.0), logs=logs,
                             identity=SimpleNamespace(signing=SimpleNamespace(public=OWN)))
    backups = SimpleNamespace(state=lambda _address: state)
    clients = {"relay": SimpleNamespace(connected=True)}
    return BackupLoop(daemon, backups, clients, lambda *_: None), state  # type: ignore[arg-type]


async def test_entries_are_counted_once_each_and_only_up_to_what_is_asked() -> None:
    logs = FakeLogs(tip=30)
    loop, state = loop_with(logs, FakeManifest(10))
    assert loop._pending_bytes(10**9) == 10**9  # the manifest's coverage is not counted yet
    await loop.count_covered("relay")
    assert loop._pending_bytes(10**9) == 20 * (HEADER + BODY)  # seqs 11..30
    logs.reads.clear()
    logs.tip = 35
    assert loop._pending_bytes(10**9) == 25 * (HEADER + BODY)
    assert logs.reads == [(30, 35)]  # only the new entries were read
    logs.reads.clear()
    assert loop._pending_bytes(10**9) == 25 * (HEADER + BODY) and logs.reads == []

    state.manifest = FakeManifest(35)  # an upload covered them: count again from there
    await loop.count_covered("relay")
    assert loop._pending_bytes(10**9) == 0
    # covered() walks every segment: never on the trio thread (issue 20).
    assert state.manifest.threads and threading.get_ident() not in state.manifest.threads
    logs.tip = 100
    logs.reads.clear()
    counted = loop._pending_bytes(5 * (HEADER + BODY))
    assert 5 * (HEADER + BODY) <= counted < 10 * (HEADER + BODY)  # stops once enough
    assert logs.reads[-1][1] < 100


def test_a_relay_whose_manifest_is_not_known_yet_counts_as_enough() -> None:
    loop, _ = loop_with(FakeLogs(tip=1), None)
    assert loop._pending_bytes(16384) == 16384
