"""What `meshd run` says when an error ends it after start-up: not "cannot start"."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

# A daemon that starts, then fails with a store error as it stops.
FAILING_DAEMON = textwrap.dedent("""
    import sys, trio
    import meshd.daemon
    from meshd.cmd import meshd as command
    from meshd.store.db import StoreError

    class FailingDaemon:
        def __init__(self, config):
            self.stopped = trio.Event()
            self._stop = trio.Event()
        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            print("ready", flush=True)
            await self._stop.wait()
            raise StoreError("cannot write: disk I/O error")
        def stop(self):
            self._stop.set()

    meshd.daemon.Daemon = FailingDaemon
    sys.exit(command.meshd_main(["run", "--state-dir", sys.argv[1], "--socket", sys.argv[2],
                                 "--no-discovery", "--listen", "127.0.0.1:0"]))
""")


def test_an_error_after_start_is_not_called_a_start_failure(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", FAILING_DAEMON, str(tmp_path / "state"), str(tmp_path / "api.sock")]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
            process.send_signal(signal.SIGTERM)
            _, errors = process.communicate(timeout=30)
        finally:
            process.kill()
    assert process.returncode == 1
    assert "cannot start" not in errors
    assert "meshd stopped by an error: StoreError: cannot write: disk I/O error" in errors
