"""SIGTERM to exit within 5 s even when a worker thread cannot be interrupted (a backup
segment being sealed, a commit): cancelling waits for threads, so the stop is bounded
outside trio (meshd/cmd/meshd.py HARD_STOP_S)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from meshd.cmd.meshd import HARD_STOP_S

# A daemon whose run, once started, sits in a worker thread that cancellation cannot stop.
STUCK_DAEMON = textwrap.dedent("""
    import sys, time, trio
    import meshd.daemon
    from meshd.cmd import meshd as command

    class StuckDaemon:
        def __init__(self, config):
            self.stopped = trio.Event()
        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            print("ready", flush=True)
            await trio.to_thread.run_sync(time.sleep, 60)
        def stop(self):
            pass

    meshd.daemon.Daemon = StuckDaemon
    sys.exit(trio.run(command._serve_until_signalled, None))
""")


def test_a_stop_stuck_in_a_worker_thread_still_exits_within_5_s() -> None:
    with subprocess.Popen([sys.executable, "-c", STUCK_DAEMON], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, errors = process.communicate(timeout=30)
            took = time.monotonic() - sent
        finally:
            process.kill()
    assert process.returncode == 0
    assert HARD_STOP_S <= took < 5.0 + 1.0, took  # the bound, not the 60 s thread
    assert "exiting without waiting for worker threads" in errors
