"""A backup the relay refuses is loud (status, relays, metrics, events) and retried with
backoff, not at every change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .daemons import DaemonProcess, RelayProcess

WAIT_S = 60.0


@pytest.mark.slow
async def test_a_refused_backup_shows_everywhere_and_backs_off(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path, extra=["--quota-bytes", "40000"])
    address = await relay.start()
    alpha = DaemonProcess(tmp_path, "alpha", relays=[address], discovery=False)
    try:
        await alpha.start()
        failed_at: list[float] = []
        async with alpha.event_stream() as events:
            await alpha.write("bulk", "x" * 60_000)  # more than the circle's quota at the relay
            with trio.fail_after(WAIT_S):
                while len(failed_at) < 3:
                    event = await events.next()
                    if event.get("type") == "relay.error" and "backup" in event["data"]["error"]:
                        failed_at.append(trio.current_time())
                        # A change after each failure: it must not bring the next try forward.
                        await alpha.write("bulk", f"change {len(failed_at)}")
        # Backoff doubles from 2 s: the third try waits at least 4 s after the second.
        assert failed_at[2] - failed_at[1] >= 4.0, failed_at
        relays = (await alpha.request("GET", "/v1/relays"))["relays"]
        backup = relays[0]["backup"]
        assert "quota-exceeded" in backup["error"] and backup["failures"] >= 3 and backup["at"] is None
        assert backup["retry_in"] > 0
        assert (await alpha.status())["relays"][0]["backup"]["error"] == backup["error"]
        metrics = (await alpha.request("GET", "/metrics", raw=True)).decode()
        failures = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith(f'meshd_backup_failures_total{{relay="{address}"}} ')]
        assert failures and failures[0] >= 3
        assert 'meshd_backup_age_seconds{' not in metrics, "no age: it never succeeded"
        shown = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "meshd.cmd.meshctl", "--socket", str(alpha.socket_path), "status"],
            capture_output=True, text=True, timeout=30))
        assert shown.returncode == 0, shown.stderr
        assert "quota-exceeded" in shown.stdout, shown.stdout  # meshctl status says so too
    finally:
        alpha.kill()
        relay.kill()
