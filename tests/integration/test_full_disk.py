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

from .daemons import ApiFailure, DaemonProcess


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
