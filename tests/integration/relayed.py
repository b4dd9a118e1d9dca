"""The set-up the relay integration tests share (tests/integration/test_relay*.py).

`relay_and_daemons()` starts the relay processes, makes the daemons (each using every relay
unless told otherwise) and kills every process it made on the way out, whatever the test did
meanwhile; `pair_through_relay()` pairs two devices that can reach each other only through
the relay (no mDNS), as a device on another network does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .daemons import CONVERGE_S, DaemonProcess, RelayProcess, start_all


@dataclass
class Relayed:
    root: Path
    relays: list[RelayProcess]
    daemons: list[DaemonProcess] = field(default_factory=list)

    @property
    def relay(self) -> RelayProcess:
        return self.relays[0]

    @property
    def address(self) -> str:
        return self.relays[0].address

    @property
    def addresses(self) -> list[str]:
        return [relay.address for relay in self.relays]

    def daemon(self, name: str, *, use_relay: bool = True, **options: Any) -> DaemonProcess:
        """Another daemon, killed with the rest; use_relay=False: no relay in its config."""
        daemon = DaemonProcess(self.root, name, relays=self.addresses if use_relay else [],
                               **options)
        self.daemons.append(daemon)
        return daemon


@asynccontextmanager
async def relay_and_daemons(
    root: Path, names: Sequence[str] = (), *, relay_names: Sequence[str] = ("relay",),
    relay_extra: Sequence[str] = (), relay_command: Sequence[str] | None = None,
    start: bool = True, **daemon_options: Any,
) -> AsyncIterator[Relayed]:
    """Relays started, one daemon per name (started unless start=False) with daemon_options."""
    relays = [RelayProcess(root, name, extra=relay_extra) for name in relay_names]
    setup = Relayed(root, relays)
    try:
        for relay in relays:
            if relay_command is not None:
                relay.command = list(relay_command)
            await relay.start()
        for name in names:
            setup.daemon(name, **daemon_options)
        if start:
            await start_all(setup.daemons)
        yield setup
    finally:
        for process in (*setup.daemons, *relays):
            process.kill()
        await trio.lowlevel.checkpoint()


async def relay_connected(daemon: DaemonProcess, limit_s: float = CONVERGE_S) -> None:
    """Wait until every relay of the daemon's is connected."""
    async def connected() -> bool:
        return all(r.get("connected") for r in (await daemon.status())["relays"])

    await daemon.until(connected, limit_s, f"{daemon.name}'s relay connections")


async def pair_through_relay(home: DaemonProcess, away: DaemonProcess,
                             address: str) -> tuple[str, dict[str, Any]]:
    """away joins home's circle through the relay at address: the code used, the join's answer."""
    await relay_connected(home)
    code: str = (await home.request("POST", "/v1/invite"))["code"]
    joined: dict[str, Any] = await away.request("POST", "/v1/join", {"code": code, "relay": address})
    return code, joined
