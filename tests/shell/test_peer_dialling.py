"""When the peer manager dials a sighted device: at once, whichever key is lower.

Both sides dial on sight and the duplicate-connection rule (the connection initiated by the
lower key wins, decided alike at both ends) settles it; a fixed wait for the higher key made
restart-to-first-peer depend on key order (1 s more for one of the two orders). The trio
clock is a MockClock, so "at once" is exact and no test waits in real time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from meshd.net.peers import Peer, PeerManager
from meshd.protocol.constants import KEEPALIVE_S
from meshd.protocol.liveness import TIMERS

LOW, HIGH = bytes(31) + b"\x01", b"\xff" * 32


def manager_knowing(own: bytes, peer: Peer, key: bytes) -> PeerManager:
    """A peer manager of the device with Noise key `own`, whose table holds `peer`."""
    daemon = SimpleNamespace(identity=SimpleNamespace(noise=SimpleNamespace(public=own)))
    manager = PeerManager(daemon)  # type: ignore[arg-type]
    manager._peers[key] = peer  # noqa: SLF001 - the table sync_members would fill
    return manager


def record_dials(manager: PeerManager) -> tuple[trio.Event, list[float]]:
    """Replace the manager's dial with one that records when it was called."""
    dialled = trio.Event()
    dialled_at: list[float] = []

    async def record_dial(target: Peer) -> None:
        dialled_at.append(trio.current_time())
        dialled.set()

    manager._dial_peer = record_dial  # type: ignore[method-assign]  # noqa: SLF001
    return dialled, dialled_at


@asynccontextmanager
async def dial_loop_running(manager: PeerManager) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        manager._nursery = nursery  # noqa: SLF001
        nursery.start_soon(manager._dial_loop)  # noqa: SLF001
        yield
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("own", "other"), [(LOW, HIGH), (HIGH, LOW)], ids=["we-are-lower", "we-are-higher"])
async def test_a_sighted_device_is_dialled_at_once_whichever_key_is_lower(
        own: bytes, other: bytes, autojump_clock: trio.testing.MockClock) -> None:
    peer = Peer(b"s" * 32, other, "other")
    manager = manager_knowing(own, peer, other)
    dialled, dialled_at = record_dials(manager)
    async with dial_loop_running(manager):
        await trio.sleep(10)  # a while after start-up, as after a restart
        manager.sighted(peer, ["127.0.0.1"], 7743)
        sighted_at = trio.current_time()
        await dialled.wait()
    assert dialled_at == [sighted_at]


async def test_a_connection_quiet_since_a_cut_is_probed_just_after_a_live_peer_would_have_spoken(
        autojump_clock: trio.testing.MockClock) -> None:
    """A connected peer's connection carries nothing after a cut. The dial loop probes it with
    a new dial (which replaces it) once it is quieter than a live peer can be (2 keepalive
    ticks, 30 s) plus 2 s: so after a 30 s partition heals, the probe comes within 2 s rather
    than waiting out TCP's retransmission backoff (issue 13: 5.3-10.6 s to converge after a
    30 s partition with a 35 s threshold)."""
    peer = Peer(b"s" * 32, HIGH, "other", addresses=[("127.0.0.1", 7743)])
    manager = manager_knowing(LOW, peer, HIGH)
    cut_at = trio.current_time()
    peer.connection = SimpleNamespace(received_at=cut_at)  # type: ignore[assignment]
    peer.confirmed = True
    dialled, dialled_at = record_dials(manager)
    async with dial_loop_running(manager):
        await dialled.wait()
    assert dialled_at == [cut_at + TIMERS.suspect_s]
    assert 2 * KEEPALIVE_S < TIMERS.suspect_s <= 2 * KEEPALIVE_S + 2.0


async def test_a_quiet_connection_we_dialled_is_probed_too(autojump_clock: trio.testing.MockClock) -> None:
    """The probe must not depend on who dialled: a connection this side initiated counts as
    "dialling" only until it is established (issue 13: after a 30 s link cut, the side that
    had dialled never probed, and the pair waited for the 40 s silence bound: 10.4 s to
    converge after the heal, 5 of 5 runs)."""
    peer = Peer(b"s" * 32, HIGH, "other", addresses=[("10.77.0.2", 7743)])
    manager = manager_knowing(LOW, peer, HIGH)
    dials: list[float] = []
    probed = trio.Event()

    async def dial(host: str, port: int, *, expected: bytes | None) -> object:
        dials.append(trio.current_time())
        if len(dials) == 2:
            probed.set()
        return SimpleNamespace(received_at=trio.current_time())

    async def run_connection(connection: SimpleNamespace, *, initiated_by_us: bool) -> None:
        peer.connection = connection  # type: ignore[assignment]
        peer.confirmed = True
        await trio.sleep_forever()  # a session that carries nothing more (a cut link)

    manager._port.dial = dial  # type: ignore[method-assign]  # noqa: SLF001
    manager._run_connection = run_connection  # type: ignore[method-assign, assignment]  # noqa: SLF001
    async with dial_loop_running(manager):
        with trio.move_on_after(10 * TIMERS.silence_s):
            await probed.wait()
    assert len(dials) >= 2, f"never probed: dials at {dials}"
    assert dials[1] == dials[0] + TIMERS.suspect_s
