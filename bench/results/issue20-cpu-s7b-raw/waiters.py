"""Tasks waiting on the commit event at each of 5 plain writes of an in-process daemon (a relay
link to a loopback port nothing listens on, no mDNS). Run: PYTHONPATH=<tree> python waiters.py"""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio
import trio.testing

from meshd.config import Config, DiscoveryConfig, ListenAddress
from meshd.daemon import Daemon


async def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        d = Path(root)
        (d / "state").mkdir()
        config = Config(state_dir=d / "state", socket_path=d / "s.sock",
                        listen=ListenAddress("127.0.0.1", 0), pairing_port=0,
                        discovery=DiscoveryConfig(enabled=False), relays=("127.0.0.1:9#" + "A" * 43,))
        daemon = Daemon(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            signal = daemon.logs.changed
            fire, waits = signal.fire, []

            def counting() -> None:
                waits.append(signal._event.statistics().tasks_waiting)
                fire()

            signal.fire = counting  # type: ignore[method-assign]
            for i in range(5):
                await daemon.logs.write("notes", f"n{i}", b"x")
                await trio.testing.wait_all_tasks_blocked()
            print(waits)
            daemon.stop()


if __name__ == "__main__":
    trio.run(main)
