"""The incremental relay backup with a real relay process and real daemons: a log larger than
one 16 MiB message backs up and recovers, and a small change uploads a small amount."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from .daemons import DaemonProcess, RelayProcess, pair, start_all, wait_connected, wait_texts

BODY_CHARS = 60_000
ENTRIES = 300  # 300 x 60 kB: about 18 MB of log, more than a 16 MiB message
BACKUP_WAIT_S = 120.0


def relay_blobs(relay: RelayProcess) -> tuple[dict[bytes, int], int]:
    """What the relay stores for backups, read from its database: segment sizes by id, and the
    manifest's size."""
    path = relay.state_dir / "relay.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        segments = {bytes(i): n for i, n in db.execute("SELECT id, length(blob) FROM segments")}
        row = db.execute("SELECT length(blob) FROM backups").fetchone()
    return segments, row[0] if row else 0


async def backup_with(daemon: DaemonProcess, entries: int,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> dict[str, Any]:
    """Wait for the relay.backup event that covers `entries` entries (subscribed first)."""
    async with daemon.event_stream() as events:
        task_status.started()
        with trio.fail_after(BACKUP_WAIT_S):
            while True:
                event = await events.next()
                if event.get("type") == "relay.backup" and event["data"]["entries"] >= entries:
                    return event["data"]  # type: ignore[no-any-return]


@pytest.mark.slow
async def test_a_log_larger_than_a_message_backs_up_incrementally_and_recovers(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    original = DaemonProcess(tmp_path, "original", relays=[address], discovery=False)
    phoenix = DaemonProcess(tmp_path, "phoenix", relays=[address], discovery=False)
    rng = random.Random(20)
    try:
        await original.start()
        words = (await original.request("POST", "/v1/recovery-key"))["words"]
        async with trio.open_nursery() as nursery:
            await nursery.start(backup_with, original, ENTRIES)
            for i in range(ENTRIES):
                await original.write("bulk", f"{i:04d} " + rng.randbytes(BODY_CHARS // 2).hex())
        segments, manifest = relay_blobs(relay)
        stored = sum(segments.values())
        assert stored > 16 * 1024 * 1024, "the whole log is at the relay, beyond one message"
        assert manifest < 64 * 1024

        # One small change: the relay receives a segment of about its size and a new manifest.
        small = "a small change"
        async with trio.open_nursery() as nursery:
            await nursery.start(backup_with, original, ENTRIES + 1)
            await original.write("bulk", small)
        after, manifest = relay_blobs(relay)
        new_bytes = sum(size for sid, size in after.items() if sid not in segments) + manifest
        assert 0 < new_bytes < 16 * 1024, f"{new_bytes} bytes uploaded for a {len(small)}-byte entry"
        relays = (await original.request("GET", "/v1/relays"))["relays"]
        assert relays[0]["backup"]["error"] is None and relays[0]["backup"]["version"] >= 2

        original.kill()  # every device is lost; the words and the relay remain
        await phoenix.start()
        # Recovery re-admits only the devices the owner confirms (issue 14): keep them all.
        preview = await phoenix.request("POST", "/v1/recover",
                                        {"words": words, "relay": address, "preview": True})
        result = await phoenix.request("POST", "/v1/recover", {
            "words": words, "relay": address, "readmit": [d["device"] for d in preview["devices"]]})
        assert result["restored_entries"] == ENTRIES + 1
        texts = await phoenix.texts("bulk")
        assert len(texts) == ENTRIES + 1 and small in texts
        assert sorted(t[:4] for t in texts if t != small) == [f"{i:04d}" for i in range(ENTRIES)]
    finally:
        for process in (original, phoenix, relay):
            process.kill()


@pytest.mark.slow
async def test_a_relay_restored_to_an_older_backup_is_caught(tmp_path: Path) -> None:
    """The operator puts back an old copy of the relay's database: the manifest it then serves
    is older than one the device stored, and the device says so instead of building on it."""
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    alpha = DaemonProcess(tmp_path, "alpha", relays=[address], discovery=False)
    old_copy = tmp_path / "relay-then.sqlite3"
    try:
        await alpha.start()
        async with trio.open_nursery() as nursery:
            await nursery.start(backup_with, alpha, 1)
            await alpha.write("notes", "one")
        database = relay.state_dir / "relay.sqlite3"
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as live, sqlite3.connect(old_copy) as copy:
            live.backup(copy)
        async with trio.open_nursery() as nursery:
            await nursery.start(backup_with, alpha, 2)
            await alpha.write("notes", "two")
        assert (await alpha.request("GET", "/v1/relays"))["relays"][0]["backup"]["version"] == 2

        relay.kill()
        for suffix in ("-wal", "-shm"):
            database.with_name(database.name + suffix).unlink(missing_ok=True)
        database.write_bytes(old_copy.read_bytes())
        async with alpha.event_stream() as events:
            await relay.start()  # same port, same key: the device reconnects by itself
            await alpha.write("notes", "three")
            with trio.fail_after(BACKUP_WAIT_S):
                while True:
                    event = await events.next()
                    if event.get("type") == "relay.misbehaved":
                        assert event["data"]["reason"] == "rollback"
                        break
        backup = (await alpha.request("GET", "/v1/relays"))["relays"][0]["backup"]
        assert backup["error"].startswith("rollback") and backup["version"] == 2
    finally:
        alpha.kill()
        relay.kill()


async def metric(daemon: DaemonProcess, name: str) -> float:
    text = (await daemon.request("GET", "/metrics", raw=True)).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.slow
async def test_two_writers_upload_their_own_entries_once(tmp_path: Path) -> None:
    """Devices share one manifest: each uploads what it wrote, not a second copy of the
    other's entries, and a compare-and-swap conflict does not waste what was uploaded."""
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    alpha = DaemonProcess(tmp_path, "alpha", relays=[address])
    beta = DaemonProcess(tmp_path, "beta", relays=[address])
    try:
        await start_all([alpha, beta])
        await pair(alpha, beta)
        await wait_connected(beta, 1)
        for i in range(20):
            await alpha.write("a", f"alpha {i} " + "x" * 500)
            await beta.write("b", f"beta {i} " + "y" * 500)
        await wait_texts(alpha, "b", {f"beta {i} " + "y" * 500 for i in range(20)})

        async def both_backed_up() -> bool:
            segments, _ = relay_blobs(relay)
            if not segments:
                return False
            status = await alpha.status()
            covered = [r["backup"] for r in status["relays"]]
            return covered[0]["error"] is None and await metric(alpha, "meshd_backup_bytes_total") > 0 \
                and await metric(beta, "meshd_backup_bytes_total") > 0

        await alpha.until(both_backed_up, BACKUP_WAIT_S, "both devices' backups")
        # Let the last uploads land: wait for the event of a backup covering all 40 entries.
        async with trio.open_nursery() as nursery:
            await nursery.start(backup_with, alpha, 41)
            await alpha.write("a", "last")
        segments, _ = relay_blobs(relay)
        uploaded = await metric(alpha, "meshd_backup_bytes_total") + await metric(beta, "meshd_backup_bytes_total")
        assert uploaded <= 1.2 * sum(segments.values()), (uploaded, sum(segments.values()))
    finally:
        for process in (alpha, beta, relay):
            process.kill()
