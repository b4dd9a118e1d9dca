"""The backup loop's count of the bytes waiting (meshd/relay/backuploop.py): own entries the
relays' manifests do not cover, read from the store once each and only up to what the window
asks for; and its wake-ups (only for a change that brings the upload forward)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from meshd.protocol.backupwindow import SETTLE_S
from meshd.relay.backuploop import BackupLoop

from .test_commit_wakeups import StepCounter

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


async def test_commits_wake_the_loop_only_when_they_bring_its_upload_forward(
        mock_clock: trio.testing.MockClock) -> None:
    """The loop was woken at every commit (a task step per entry) to find its wait unchanged
    (issue 20): now the change works the window's answer out and wakes it only if the upload
    comes sooner. The uploads still happen once the bytes, or the window's time, say so."""
    logs = FakeLogs(tip=10)
    loop, state = loop_with(logs, FakeManifest(10))
    await loop.count_covered("relay")
    uploads: list[float] = []

    async def upload() -> None:  # the relay's manifest covers the log as the upload began
        uploads.append(trio.current_time())
        state.manifest = FakeManifest(logs.tip)
        # As count_covered() leaves it, without its worker thread (which wait_all_tasks_blocked
        # does not wait for).
        loop._covers["relay"] = (state.manifest, logs.tip)

    loop._upload = upload  # type: ignore[method-assign]
    steps = StepCounter("BackupLoop.run")
    trio.lowlevel.add_instrument(steps)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            await trio.testing.wait_all_tasks_blocked()
            before = steps.count
            for _ in range(12):  # 12 entries of 1,100 bytes: less than the window's 16 KiB
                logs.tip += 1
                loop.changed()
                await trio.testing.wait_all_tasks_blocked()
            assert steps.count - before == 1  # the first set the window's time; was 12
            assert uploads == []
            logs.tip += 10  # 24 KB waiting: due once the settle time has passed
            loop.changed()
            await trio.testing.wait_all_tasks_blocked()
            assert steps.count - before == 2
            mock_clock.jump(SETTLE_S)
            await trio.testing.wait_all_tasks_blocked()
            assert uploads == [SETTLE_S]
            before = steps.count
            for _ in range(3):  # a few entries: the window's time decides
                logs.tip += 1
                loop.changed()
                await trio.testing.wait_all_tasks_blocked()
            assert steps.count - before == 1
            mock_clock.jump(20.0 - 0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert len(uploads) == 1
            mock_clock.jump(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert uploads == [SETTLE_S, SETTLE_S + 20.0]
            loop.changed(prompt=True)  # prompt: woken, uploaded after the settle time
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(SETTLE_S)
            await trio.testing.wait_all_tasks_blocked()
            assert uploads == [SETTLE_S, SETTLE_S + 20.0, 2 * SETTLE_S + 20.0]
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(steps)


async def test_a_commit_of_other_authors_entries_costs_the_waiting_loop_no_count(
        mock_clock: trio.testing.MockClock) -> None:
    """Half the commits a device hears are other authors' entries: they change nothing the
    window's answer depends on (the own entries waiting, the relays' manifests), so the
    answer the loop waits on is not worked out again for them (issue 20). An own entry, or a
    prompt change, still is, and still brings the upload forward."""
    logs = FakeLogs(tip=10)
    loop, state = loop_with(logs, FakeManifest(10))
    await loop.count_covered("relay")
    uploads: list[float] = []

    async def upload() -> None:
        uploads.append(trio.current_time())
        state.manifest = FakeManifest(logs.tip)
        loop._covers["relay"] = (state.manifest, logs.tip)

    loop._upload = upload  # type: ignore[method-assign]
    answers: list[float | None] = []
    due_in = loop.window.due_in

    def counted(*args: Any) -> float | None:
        answers.append(due := due_in(*args))
        return due

    loop.window.due_in = counted  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.run)
        await trio.testing.wait_all_tasks_blocked()
        logs.tip += 1  # an own entry: the window's time starts
        loop.changed()
        await trio.testing.wait_all_tasks_blocked()
        answers.clear()
        for _ in range(20):  # other authors' entries: the own tip stays
            loop.changed()
            await trio.testing.wait_all_tasks_blocked()
        assert answers == []  # was 20
        logs.tip += 20  # 22 KB of own entries: due once the settle time has passed
        loop.changed()
        await trio.testing.wait_all_tasks_blocked()
        assert answers
        mock_clock.jump(SETTLE_S)
        await trio.testing.wait_all_tasks_blocked()
        assert uploads == [SETTLE_S]
        answers.clear()
        loop.changed()  # another author's entries, the window empty: its time starts
        await trio.testing.wait_all_tasks_blocked()
        assert answers
        answers.clear()
        loop.changed(prompt=True)  # prompt: worked out, and uploaded after the settle time
        await trio.testing.wait_all_tasks_blocked()
        assert answers
        mock_clock.jump(SETTLE_S)
        await trio.testing.wait_all_tasks_blocked()
        assert uploads == [SETTLE_S, 2 * SETTLE_S]
        nursery.cancel_scope.cancel()
