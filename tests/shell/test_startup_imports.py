"""What a daemon imports before its first peer (issue 16, start to first peer).

Python start-up and imports are most of the time from spawn to READY=1, so what only the
relay, recovery and backup paths use is loaded when first used: a LAN-only start never pays
for it. This pins that: a module here that becomes a start-up import again fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Imported by `meshd run` before READY=1 (meshd/cmd/meshd.py, meshd/daemon.py, discovery).
STARTUP = "import meshd.cmd.meshd, meshd.daemon, meshd.net.discovery"
# Loaded on first use only: recovery, the backup reader and writer, the relay client and wire.
NOT_AT_STARTUP = [
    "meshd.relay.recovery", "meshd.relay.session", "meshd.relay.links", "meshd.restore",
    "meshd.backupblobs", "meshd.backup", "meshd.protocol.backupset",
    "meshd.protocol.backupchain", "meshd.protocol.envelope", "meshd.protocol.relay",
]


def test_relay_recovery_and_backup_modules_are_not_imported_at_startup() -> None:
    code = f"{STARTUP}; import sys; print(' '.join(sorted(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    loaded = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    assert "meshd.daemon" in loaded
    assert [name for name in NOT_AT_STARTUP if name in loaded] == []


def test_the_lazily_loaded_paths_still_import() -> None:
    # What memberservice now imports on first use resolves (no cycle, no typo).
    from meshd.protocol.admission import Admission
    from meshd.protocol.relaycodes import RELAY_FULL, RelayError
    from meshd.relay.recovery import recover

    assert callable(recover)
    try:
        Admission(max_total_bytes=10).check_store(11, 0)
    except RelayError as err:
        assert err.code == RELAY_FULL
    else:
        raise AssertionError("check_store did not refuse")
