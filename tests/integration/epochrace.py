"""Concurrent epoch changes with real daemons and a real relay process (protocol/circle.md,
"An epoch is the record that made it"): the scenario, shared by test_epoch_race.py and
bench/circle_attacks.py.

The API has no bare "rotate", but pairing is one: adding a device starts an epoch sealed to
every member. So the real-world race is: alpha removes the thief while beta, cut off from it,
pairs a new phone. Both records carry the same epoch number; beta's is sealed to the thief.
The partition is made by stopping processes (the relay included: it would carry alpha's
removal to beta). A rule that told the two records apart by hash alone would pick the
pairing's when its hash is the higher: that is the order under test. So each side is
replayed from its saved state until it holds: alpha's until the removal's hash is in the
lower half, then beta's until the pairing's is higher (each try succeeds with p >= 1/2).

run_race() returns what an observer outside the daemons sees after the heal; it raises
AssertionError (with the daemon's log) only when the scenario itself cannot proceed.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio

from meshd.identity import load_or_create_identity
from meshd.protocol.circle import Circle, epoch_keys
from meshd.protocol.crypto import unseal
from meshd.protocol.records import CircleOperationError

from .daemons import CONVERGE_S, DaemonProcess, RelayProcess, pair, start_all, wait_texts
from .test_device_port_privacy import _stranger_knocks

XXPSK0 = b"Noise_XXpsk0_25519_ChaChaPoly_BLAKE2b"
MAX_ATTEMPTS = 20  # each side's order comes up with probability >= 1/2 per try
HALF = bytes([0x80]) + bytes(31)  # hashes below it are in the lower half
BEFORE = "before the race"
AFTER = "written after the race"


def stored_circle(daemon: DaemonProcess) -> Circle:
    """The circle as the daemon last saved it (read-only, while it runs)."""
    path = daemon.state_dir / "meshd.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        row = db.execute("SELECT value FROM state WHERE key = 'circle.records'").fetchone()
    return Circle.from_records(msgpack.unpackb(bytes(row[0])))


def port_of(status: dict[str, Any]) -> int:
    return int(status["listen"][0].rsplit(":", 1)[1])


@dataclass
class RaceOutcome:
    race_number: int = 0
    removal: bytes = b""  # alpha's remove of the thief: epoch race_number, not sealed to it
    pairing: bytes = b""  # beta's pairing epoch: race_number too, sealed to the thief
    removal_attempts: int = 0  # removals on alpha's side until its hash was in the lower half
    attempts: int = 0  # pairings on beta's side until the pairing's hash was the higher
    settled: bool = False  # every member holds the same records and current epoch record
    current_sealed_to_thief: bool = True
    thief_psk_taken_by: list[str] = field(default_factory=list)  # members whose port took it
    number_means_removal: dict[str, bool] = field(default_factory=dict)  # this process's reading
    lost: dict[str, list[str]] = field(default_factory=dict)  # member -> acknowledged texts missing
    thief_member: bool = True
    thief_read_after: bool = True

    @property
    def converged_on_removal(self) -> bool:
        """The figure the bench counts: one circle, the race's number meaning the removal's
        record at every member's door, nothing lost, and the thief out and unable to read."""
        return (self.settled and not self.current_sealed_to_thief and not self.thief_psk_taken_by
                and not any(self.lost.values()) and not self.thief_member
                and not self.thief_read_after)


async def run_race(root: Path, launcher: Sequence[str] = (sys.executable, "-m", "meshd")) -> RaceOutcome:
    out = RaceOutcome()
    relay = RelayProcess(root)
    address = await relay.start()
    alpha, beta, thief, phone = (DaemonProcess(root, name, relays=[address], launcher=launcher)
                                 for name in ("alpha", "beta", "thief", "phone"))
    daemons = [alpha, beta, thief, phone]
    members = [alpha, beta, phone]
    try:
        await start_all([alpha, beta, thief])
        await pair(alpha, beta)
        await pair(alpha, thief)
        await alpha.write("chat", BEFORE)
        await wait_texts(beta, "chat", {BEFORE})
        await wait_texts(thief, "chat", {BEFORE})
        out.race_number = (await alpha.status())["epoch"] + 1
        thief_id = (await thief.status())["device"]

        # Cut off: every process stops (the relay too: it would carry one side's change to
        # the other), then each side works alone from its saved state.
        for daemon in (beta, thief, alpha):
            assert await daemon.stop() == 0
        relay.kill()
        saved = {d.name: root / f"{d.name}-before-the-race" for d in (alpha, beta)}
        for daemon in (alpha, beta):
            shutil.copytree(daemon.state_dir, saved[daemon.name])

        # alpha removes the thief, until the removal's hash is in the lower half.
        await _replayed(alpha, saved["alpha"], (), lambda: _remove(alpha, thief_id, out),
                        lambda: out.removal < HALF)
        acked = ["alpha while cut off"]
        await alpha.write("chat", acked[0])
        assert await alpha.stop() == 0

        # beta pairs a phone, until the pairing's hash is the higher.
        await _replayed(beta, saved["beta"], (phone,), lambda: _pair(beta, phone, out),
                        lambda: out.pairing > out.removal)
        for daemon, text in ((beta, "beta while cut off"), (phone, "phone while cut off")):
            await daemon.write("chat", text)
            acked.append(text)
        assert await beta.stop() == 0
        assert await phone.stop() == 0

        # Heal: the relay comes back on its port, every device starts again.
        assert await relay.start() == address
        await start_all(daemons)

        async def thief_knows() -> bool:
            return (await thief.status())["member"] is False

        await thief.until(thief_knows, CONVERGE_S, "the thief to learn of its removal")
        out.thief_member = False
        await _observe(out, members, thief, acked)
    finally:
        for process in (*daemons, relay):
            process.kill()
    return out


async def _replayed(daemon: DaemonProcess, saved: Path, fresh: Sequence[DaemonProcess],
                    act: Callable[[], Awaitable[None]], done: Callable[[], bool]) -> None:
    """Start daemon (and the fresh ones), act, and start over from daemon's saved state
    (the fresh ones from nothing) until done()."""
    for _ in range(MAX_ATTEMPTS):
        await start_all([daemon, *fresh])
        await act()
        if done():
            return
        for process in (daemon, *fresh):
            assert await process.stop() == 0
        shutil.rmtree(daemon.state_dir)
        shutil.copytree(saved, daemon.state_dir)
        for process in fresh:
            shutil.rmtree(process.state_dir)
    raise AssertionError(f"{daemon.name}: the hash order did not come up in {MAX_ATTEMPTS} tries")


async def _remove(alpha: DaemonProcess, thief_id: str, out: RaceOutcome) -> None:
    await alpha.request("POST", f"/v1/devices/{thief_id[:16]}/remove")
    out.removal_attempts += 1
    out.removal = stored_circle(alpha).state.epoch_record or b""


async def _pair(beta: DaemonProcess, phone: DaemonProcess, out: RaceOutcome) -> None:
    await pair(beta, phone)

    async def paired() -> bool:
        return stored_circle(beta).state.epoch_number == out.race_number

    await beta.until(paired, CONVERGE_S, "beta to save the pairing's epoch")
    out.attempts += 1
    out.pairing = stored_circle(beta).state.epoch_record or b""


async def _observe(out: RaceOutcome, members: list[DaemonProcess], thief: DaemonProcess,
                   acked: list[str]) -> None:
    alpha, beta, phone = members

    async def settled() -> bool:
        circles = [stored_circle(d) for d in members]
        return (len({tuple(sorted(c.records())) for c in circles}) == 1
                and len({c.state.epoch_record for c in circles}) == 1
                and not circles[0].state.needs_rotation)

    try:
        for daemon in members:
            await wait_texts(daemon, "chat", {BEFORE, *acked})
            await daemon.until(settled, CONVERGE_S, "every member to hold one circle")
        out.settled = True
    except AssertionError:
        out.settled = False
    for daemon in members:
        texts = set(await daemon.texts("chat"))
        out.lost[daemon.name] = sorted({BEFORE, *acked} - texts)

    circle = stored_circle(alpha)
    thief_dh = load_or_create_identity(thief.state_dir).noise
    pairing, removal = circle.record(out.pairing), circle.record(out.removal)
    assert pairing.epoch == removal.epoch == out.race_number, "no race: the numbers differ"
    assert bytes(thief_dh.public) in pairing.boxes and bytes(thief_dh.public) not in removal.boxes
    current = circle.state.epoch_record
    out.current_sealed_to_thief = current is None or bytes(thief_dh.public) in circle.record(current).boxes

    # At each member's door: does it take the thief's key for the race's number?
    thief_key = unseal(thief_dh, pairing.boxes[bytes(thief_dh.public)])
    psk = epoch_keys(out.race_number, thief_key).device_psk
    for daemon in members:
        received, _ = await trio.to_thread.run_sync(
            _stranger_knocks, port_of(await daemon.status()), XXPSK0, psk)
        if received:
            out.thief_psk_taken_by.append(daemon.name)
    # The same question asked of this process's code over each member's saved records.
    for daemon in members:
        dh = load_or_create_identity(daemon.state_dir).noise
        try:
            key = stored_circle(daemon).epoch_key(dh, out.race_number)
        except CircleOperationError:  # the phone joined by the other record: nothing to read
            out.number_means_removal[daemon.name] = bytes(dh.public) not in removal.boxes
            continue
        box = removal.boxes.get(bytes(dh.public))
        out.number_means_removal[daemon.name] = box is not None and key == unseal(dh, box)

    # Written after the heal: the members read it, the thief does not.
    await beta.write("chat", AFTER)
    for daemon in (alpha, phone):
        await wait_texts(daemon, "chat", {AFTER})
    out.thief_read_after = AFTER in await thief.texts("chat")
