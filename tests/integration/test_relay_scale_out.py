"""Several `meshd relay --database postgresql://...` processes on one real PostgreSQL
database behave as one relay: one key, pushes across processes, one quota, one record set,
one backup; and devices that lose a process carry on at another, losing nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.envelope import seal_backup
from meshd.protocol.relay import (
    CONFLICT,
    NAMEPLATE_IN_USE,
    NO_OFFER,
    NOT_A_MEMBER,
    QUOTA_EXCEEDED,
    UNAVAILABLE,
    RelayError,
)
from meshd.relay.address import RelayAddress
from meshd.relay.client import RelayClient
from meshd.relay.pipe import open_join_pipe
from meshd.relay.session import open_relay_session

from ..shell.test_relay import Inbox, current_keys, make_circle, seal_for
from .daemons import (
    CONVERGE_S,
    DaemonProcess,
    RelayProcess,
    pair,
    start_all,
    wait_connected,
    wait_texts,
)

psycopg = pytest.importorskip("psycopg")
# Each test starts two or three relay processes (and some daemons): several seconds each.
pytestmark = pytest.mark.slow

START_TIMEOUT_S = 30


class Relays:
    """Relay processes on one database and one state directory (one key file)."""

    def __init__(self, state_dir: Path, dsn: str, extra: tuple[str, ...] = ()) -> None:
        self.state_dir = state_dir
        self.dsn = dsn
        self.extra = extra
        self.processes: list[trio.Process] = []
        self.addresses: list[str] = []

    async def start(self) -> str:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "meshd", "relay", "--state-dir", str(self.state_dir),
             "--listen", "127.0.0.1:0", "--database", self.dsn, "--log-level", "warning",
             *self.extra], stdout=subprocess.PIPE)
        self.processes.append(process)
        self.addresses.append("")  # filled in below: addresses[i] is processes[i]'s
        index = len(self.processes) - 1
        assert process.stdout is not None
        line = b""
        with trio.fail_after(START_TIMEOUT_S):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                if not chunk:
                    raise AssertionError(f"relay exited with {await process.wait()} first")
                line += chunk
        address = self.addresses[index] = line.decode().strip()
        return address

    async def start_together(self, count: int) -> list[str]:
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(self.start)
        return self.addresses

    def stop_all(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.kill()
        for process in self.processes:
            if process.stdout is not None:
                process.stdout.close()


@asynccontextmanager
async def relays_on(tmp_path: Path, dsn: str, count: int,
                    extra: tuple[str, ...] = ()) -> AsyncIterator[Relays]:
    relays = Relays(tmp_path / "relay-state", dsn, extra)
    try:
        await relays.start_together(count)
        yield relays
    finally:
        relays.stop_all()
        with trio.move_on_after(10) as waited:
            for process in relays.processes:
                await process.wait()
        assert not waited.cancelled_caught


async def test_processes_started_together_share_one_key_and_a_push_crosses_processes(
    tmp_path: Path, postgres_dsn: str
) -> None:
    circle, m, _ = make_circle("alice", "bob")
    inbox = Inbox(circle, m["bob"])
    async with relays_on(tmp_path, postgres_dsn, 3) as relays:
        keys = {RelayAddress.parse(a).key for a in relays.addresses}
        assert len(keys) == 1  # one key file, written once, though all three raced for it
        pushed: list[Any] = []
        arrived = trio.Event()

        def on_push(envelopes: Any) -> None:
            pushed.extend(envelopes.items)
            if len(pushed) == 3:
                arrived.set()

        first, second, third = relays.addresses
        async with open_relay_session(second, m["bob"].dh, circle.records(), on_push=on_push) as bob:
            await bob.subscribe(inbox.mailbox())
            for n, address in enumerate((first, third, first), start=1):
                async with open_relay_session(address, m["alice"].dh, circle.records()) as alice:
                    await alice.deposit(inbox.mailbox(), seal_for(circle, m["alice"], m["bob"], n, f"m{n}"))
            with trio.fail_after(10):
                await arrived.wait()
    inbox.read(pushed)
    assert [p["text"] for p in inbox.letters] == ["m1", "m2", "m3"] and inbox.problems == []


async def test_quota_backup_and_removals_hold_across_processes(
    tmp_path: Path, postgres_dsn: str
) -> None:
    circle, m, rng = make_circle("alice", "bob", "carol")
    box = bytes(32)
    keys = current_keys(circle, m["alice"])
    async with relays_on(tmp_path, postgres_dsn, 2, ("--quota-bytes", "3000")) as relays:
        one, two = relays.addresses
        async with open_relay_session(one, m["alice"].dh, circle.records()) as alice, \
                open_relay_session(two, m["bob"].dh, circle.records()) as bob, \
                open_relay_session(two, m["carol"].dh, circle.records()) as carol:
            # Quota: what alice stored at one counts at two.
            for n in range(3):
                await alice.deposit(box, bytes([n]) * 1000)

            async def used_at_two(expected: int) -> None:
                # Two learns of one's changes by a notification: poll its tally (bounded).
                with trio.fail_after(10):
                    while (await bob.register([])).used != expected:  # noqa: ASYNC110
                        await trio.sleep(0.05)

            await used_at_two(3000)
            with pytest.raises(RelayError) as refused:
                await bob.deposit(box, b"\x09" * 10)
            assert refused.value.code == QUOTA_EXCEEDED
            await alice.ack(box, 10**9)  # frees it all, at one
            await used_at_two(0)
            await bob.deposit(box, b"\x09" * 10)

            # Backup compare-and-swap: alice at one and bob at two race from version 0.
            def blob(version: int) -> bytes:
                return seal_backup(keys=keys, circle_id=circle.circle_id,
                                   signer=m["alice"].signer, version=version,
                                   snapshot={"v": version}, rng=rng)

            outcomes: list[str] = []

            async def put(session: Any) -> None:
                try:
                    await session.backup_put(0, 1, blob(1))
                    outcomes.append("ok")
                except RelayError as err:
                    outcomes.append(err.code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(put, alice)
                nursery.start_soon(put, bob)
            assert sorted(outcomes) == [CONFLICT, "ok"]

            # A removal registered at one closes the removed member's connection at two.
            circle.remove_device(m["alice"].signer, m["carol"].sign_key, rng)
            await alice.register(circle.records())
            with trio.fail_after(10):
                await carol.wait_closed()
            assert carol.closed_error is not None and carol.closed_error.code == NOT_A_MEMBER


async def test_kill_9_of_one_process_loses_no_acknowledged_envelope(
    tmp_path: Path, postgres_dsn: str
) -> None:
    # Devices know all three addresses of the relay. Alice deposits in order and bob
    # drains (subscription + acks), both through the first process, which is killed with
    # SIGKILL mid-stream. Both fail over to another address; every envelope alice was told
    # was stored reaches bob.
    circle, m, _ = make_circle("alice", "bob")
    inbox = Inbox(circle, m["bob"])
    total, kill_at = 400, 120
    async with relays_on(tmp_path, postgres_dsn, 3, ("--rate", "100000", "--burst", "100000")) \
            as relays:
        first = relays.processes[0]
        alice = RelayClient(relays.addresses[0], m["alice"].dh, circle.records,
                            alternates=relays.addresses[1:], min_backoff_s=0.05)
        bob = RelayClient(relays.addresses[0], m["bob"].dh, circle.records,
                          alternates=relays.addresses[1:], min_backoff_s=0.05)
        acknowledged: set[int] = set()
        received: dict[int, bytes] = {}
        everything = trio.Event()

        async def depositor(seqs: range) -> None:
            for seq in seqs:
                envelope = seal_for(circle, m["alice"], m["bob"], seq, f"letter {seq}")
                while True:
                    try:
                        await alice.deposit(inbox.mailbox(), envelope)
                        break
                    except RelayError as err:
                        assert err.code == UNAVAILABLE, err  # the process died: again elsewhere
                        # Let the client notice the session ended before asking again.
                        await trio.lowlevel.checkpoint()
                acknowledged.add(seq)
                if len(acknowledged) == kill_at:
                    first.send_signal(signal.SIGKILL)

        async def drainer() -> None:
            # Pushes are hints (RelayClient.watch); bob fetches after his cursor.
            watch = await bob.watch(inbox.mailbox())
            cursor = 0
            while True:
                await watch.wait()
                more = True
                while more:
                    try:
                        answer = await bob.fetch(inbox.mailbox(), cursor)
                    except RelayError as err:
                        assert err.code == UNAVAILABLE, err
                        break  # the next session hints
                    more = answer.more and bool(answer.items)
                    for envelope_id, envelope in answer.items:
                        before = len(inbox.letters)
                        inbox.read([(envelope_id, envelope)])
                        for letter in inbox.letters[before:]:
                            received[int(letter["text"].split()[1])] = envelope
                        cursor = envelope_id
                        if envelope_id % 16 == 0:
                            try:
                                await bob.ack(inbox.mailbox(), envelope_id)
                            except RelayError as err:
                                assert err.code == UNAVAILABLE, err
                    if len(received) == total:
                        everything.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(alice.run)
            await nursery.start(bob.run)
            nursery.start_soon(drainer)
            with trio.fail_after(120):
                await depositor(range(1, total + 1))
                assert await first.wait() == -signal.SIGKILL
                await everything.wait()
            for device in (alice, bob):  # each moved to another process of the same relay
                assert device.connects >= 2
                assert device.address != RelayAddress.parse(relays.addresses[0])
            nursery.cancel_scope.cancel()
    assert acknowledged == set(range(1, total + 1))
    assert set(received) == acknowledged  # 0 acknowledged envelopes lost
    # A deposit whose answer died with the process is sent again: bob sees the copy as a
    # replay; he sees nothing out of order and nothing forged.
    assert set(inbox.problems) <= {"replay"}, inbox.problems


async def test_daemons_fail_over_between_the_addresses_of_one_relay(
    tmp_path: Path, postgres_dsn: str
) -> None:
    # Two daemons list both addresses of one relay (two processes, one database, one key).
    # They keep one session to it. The process alpha uses is killed; beta, away meanwhile
    # and off the LAN, still gets what alpha wrote, through the other address.
    relays = [RelayProcess(tmp_path, f"relay{n}", extra=("--database", postgres_dsn))
              for n in (1, 2)]
    relays[1].state_dir = relays[0].state_dir  # one key file
    addresses = [await relay.start() for relay in relays]
    assert len({RelayAddress.parse(a).key for a in addresses}) == 1
    alpha = DaemonProcess(tmp_path, "alpha", relays=addresses)
    beta = DaemonProcess(tmp_path, "beta", relays=addresses)
    try:
        await start_all([alpha, beta])
        await pair(alpha, beta)
        await wait_connected(beta, 1)

        async def connected_via(daemon: DaemonProcess) -> str | None:
            """The one address of the relay the daemon's session uses (one session only)."""
            entries = (await daemon.status())["relays"]
            assert {e["address"] for e in entries} == set(addresses)
            used = [e["address"] for e in entries if e["connected"]]
            assert len(used) <= 1, entries
            return used[0] if used else None

        used = await alpha.until(lambda: connected_via(alpha), CONVERGE_S, "alpha on the relay")
        assert await beta.stop() == 0
        killed = addresses.index(used)
        relays[killed].kill()  # SIGKILL the process alpha uses
        other = addresses[1 - killed]
        await alpha.until(lambda: _is(connected_via(alpha), other), CONVERGE_S,
                          "alpha on the relay's other address")
        await alpha.write("chat", "written while one relay process was gone")
        beta.reconfigure(discovery=False)
        await beta.start()
        await wait_texts(beta, "chat", {"written while one relay process was gone"})
        peers = (await beta.request("GET", "/v1/peers"))["peers"]
        assert [p["connected"] for p in peers] == [False], "the entry came through the relay only"
    finally:
        for process in (alpha, beta, *relays):
            process.kill()
        await trio.lowlevel.checkpoint()


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_an_offer_at_one_process_is_joined_at_another(
    tmp_path: Path, postgres_dsn: str
) -> None:
    circle, m, rng = make_circle("alice")
    newbie = DHKeyPair.generate(rng)
    nameplate = 424
    async with relays_on(tmp_path, postgres_dsn, 2) as relays:
        one, two = relays.addresses
        async with open_relay_session(one, m["alice"].dh, circle.records()) as alice:
            offered: list[Any] = []
            ready = trio.Event()

            async def offer() -> None:
                offered.append(await alice.rendezvous(nameplate))
                ready.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(offer)

                def recorded() -> bool:  # the offer is in the database: joinable anywhere
                    with psycopg.connect(postgres_dsn) as db:
                        return db.execute("SELECT 1 FROM rendezvous_offers WHERE nameplate = %s",
                                          (nameplate,)).fetchone() is not None

                with trio.fail_after(10):
                    while not await trio.to_thread.run_sync(recorded):  # noqa: ASYNC110
                        await trio.sleep(0.05)
                # The nameplate is taken relay-wide, whichever process is asked.
                async with open_relay_session(two, m["alice"].dh, circle.records()) as again:
                    with pytest.raises(RelayError) as taken:
                        await again.rendezvous(nameplate)
                    assert taken.value.code == NAMEPLATE_IN_USE
                joiner = await open_join_pipe(two, newbie, nameplate)
                with trio.fail_after(10):
                    await ready.wait()
                inviter = offered[0]
                await joiner.send_all(b"hello from the new device")
                with trio.fail_after(10):
                    assert await inviter.receive_some() == b"hello from the new device"
                    await inviter.send_all(b"welcome")
                    assert await joiner.receive_some() == b"welcome"
                await joiner.aclose()
                with trio.fail_after(10):
                    assert await inviter.receive_some() == b""  # the joiner's close crossed
                await inviter.aclose()
            # Consumed: a second join, at either process, finds nothing.
            for address in (one, two):
                with pytest.raises(RelayError) as refused:
                    await open_join_pipe(address, DHKeyPair.generate(rng), nameplate)
                assert refused.value.code == NO_OFFER
