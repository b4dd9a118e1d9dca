"""A real daemon whose state directory fills up: a clear error, nothing acknowledged lost.

The state directory is a 3 MiB tmpfs (root only; skipped with the reason otherwise), so the
disk really is full: SQLite gets SQLITE_FULL, not a simulated limit.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio

from .daemons import CONVERGE_S, ApiFailure, DaemonProcess, pair, start_all, wait_connected


def mount_tmpfs(path: Path, size: str) -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "mounting a small tmpfs needs root"
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                            capture_output=True, text=True)
    return result.returncode == 0, result.stderr.strip() or "mount failed"


async def test_full_disk_refuses_writes_and_keeps_what_was_acknowledged(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "tiny", discovery=False)
    mounted, why = await trio.to_thread.run_sync(mount_tmpfs, daemon.state_dir, "3m")
    if not mounted:
        pytest.skip(why)
    try:
        await daemon.start()
        acknowledged = []
        with pytest.raises(ApiFailure) as full:
            for i in range(200):  # 200 x 64 KiB is far past 3 MiB
                await daemon.write("photos", f"{i:04d}" + "x" * 65_000, record_id=f"r{i}")
                acknowledged.append(f"r{i}")
        assert full.value.status == 507 and full.value.code == "storage-full"
        assert len(acknowledged) > 5
        # The daemon is still up, and every acknowledged record is there, whole.
        records = await daemon.records("photos")
        assert [r["id"] for r in records] == acknowledged
        assert all(len(r["body"]) == 65_004 for r in records)
        assert (await daemon.status())["entries"] == len(acknowledged)
        assert await daemon.stop() == 0  # and it still stops cleanly
    finally:
        daemon.kill()
        await trio.to_thread.run_sync(
            lambda: subprocess.run(["umount", "-l", str(daemon.state_dir)], capture_output=True))


async def test_full_disk_during_sync_ends_that_sync_not_the_daemon(tmp_path: Path) -> None:
    tiny, big = DaemonProcess(tmp_path, "tiny"), DaemonProcess(tmp_path, "big")
    mounted, why = await trio.to_thread.run_sync(mount_tmpfs, tiny.state_dir, "3m")
    if not mounted:
        pytest.skip(why)
    try:
        await start_all([tiny, big])
        await pair(big, tiny)
        await wait_connected(tiny, 1)
        async with tiny.event_stream() as events:
            for i in range(80):  # 5 MiB for a 3 MiB disk
                await big.write("photos", f"{i:04d}" + "x" * 65_000)
            with trio.fail_after(CONVERGE_S):
                while True:
                    event = await events.next()
                    if event.get("type") == "peer.down":
                        break
        assert event["data"]["reason"] == "local storage error"
        # The disk stays full: sync is retried with a growing pause (1 s, then 2 s), not in
        # a tight loop, and the error is logged once, not once per attempt.
        first = trio.current_time()
        async with tiny.event_stream() as events:
            downs = 0
            with trio.fail_after(60):
                while downs < 2:
                    event = await events.next()
                    downs += event.get("type") == "peer.down"
        assert trio.current_time() - first >= 1.0 + 2.0 - 0.5  # less the first's latency
        assert tiny.log().count("stopped: ") == 1, tiny.log()[-3000:]
        # The daemon is still serving, and what it committed before the disk filled is whole.
        status = await tiny.status()
        assert status["member"] and 0 < status["entries"] < 80
        records = await tiny.records("photos")
        assert all(len(r["body"]) == 65_004 for r in records)
        assert await tiny.stop() == 0
    finally:
        tiny.kill()
        big.kill()
        await trio.to_thread.run_sync(
            lambda: subprocess.run(["umount", "-l", str(tiny.state_dir)], capture_output=True))
