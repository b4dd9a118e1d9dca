"""The zeroconf bridge on loopback: members find each other, strangers learn nothing lasting,
and the trio loop never waits on zeroconf."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import trio
from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from meshd.net.discovery import Discovery, Sighting, select_addresses
from meshd.protocol.discovery import SERVICE_TYPE, WINDOW_S
from tests.polling import poll_until

LOOPBACK = ["127.0.0.1"]
WAIT_S = 10.0


class WallClock:
    """An injected wall clock, so a test can cross a window boundary at once."""

    def __init__(self, now: float = 1_000 * WINDOW_S + 10.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def discovery(hint: bytes, port: int, keys: Callable[[], list[bytes]], clock: WallClock,
              **kwargs: object) -> Discovery:
    options: dict[str, object] = {"interfaces": LOOPBACK, "poll_interval": 0.05, **kwargs}
    return Discovery(port=port, device_hint=hint, discovery_keys=keys, wall_clock=clock,
                     **options)  # type: ignore[arg-type]


async def wait_until(condition: Callable[[], bool]) -> None:
    """The discovery code exposes counters (seen, readvertised), not events, for these."""
    await poll_until(condition, WAIT_S)


async def next_sighting(d: Discovery) -> Sighting:
    with trio.fail_after(WAIT_S):
        return await d.sightings.receive()


async def test_two_members_find_each_other() -> None:
    key, clock = os.urandom(32), WallClock()
    async with discovery(b"A" * 8, 1111, lambda: [key], clock) as a, \
            discovery(b"B" * 8, 2222, lambda: [key], clock) as b:
        assert await next_sighting(a) == Sighting(b"B" * 8, ["127.0.0.1"], 2222)
        assert await next_sighting(b) == Sighting(b"A" * 8, ["127.0.0.1"], 1111)
        await wait_until(lambda: a.seen["own"] >= 1)
        with pytest.raises(trio.WouldBlock):  # its own advert was seen and not reported
            a.sightings.receive_nowait()


async def test_another_circle_sees_nothing_it_can_recognise() -> None:
    clock = WallClock()
    key, other = os.urandom(32), os.urandom(32)
    async with discovery(b"A" * 8, 1111, lambda: [key], clock), \
            discovery(b"C" * 8, 3333, lambda: [other], clock) as c:
        await wait_until(lambda: c.seen["stranger"] >= 1)
        assert c.seen["member"] == 0
        with pytest.raises(trio.WouldBlock):
            c.sightings.receive_nowait()


async def test_an_epoch_change_readvertises_under_the_new_key() -> None:
    clock, old, new = WallClock(), os.urandom(32), os.urandom(32)
    keys_of_a = [old]
    async with discovery(b"A" * 8, 1111, lambda: list(keys_of_a), clock) as a, \
            discovery(b"B" * 8, 2222, lambda: [new], clock) as b:
        await wait_until(lambda: b.seen["stranger"] >= 1)
        assert b.seen["member"] == 0
        first = a.advert
        keys_of_a[:] = [new, old]
        assert (await next_sighting(b)).tag_owner == b"A" * 8
        # b may see the new advert before a's task returns from registering it and records it.
        assert first is not None
        await wait_until(lambda: a.advert is not None)
        assert a.advert is not None and a.advert.instance != first.instance


async def test_an_address_change_readvertises_with_the_new_addresses() -> None:
    key, clock = os.urandom(32), WallClock()
    interfaces = [("lo", "127.0.0.1")]
    async with discovery(b"A" * 8, 1111, lambda: [key], clock, interfaces=["lo"],
                         addresses=lambda: list(interfaces)) as a, \
            discovery(b"B" * 8, 2222, lambda: [key], clock) as b:
        assert (await next_sighting(b)).addresses == ["127.0.0.1"]
        interfaces.append(("lo", "127.0.0.2"))  # an address appears on an allowed interface
        assert (await next_sighting(b)).addresses == ["127.0.0.1", "127.0.0.2"]
        # b may see the new advert before a's task returns from registering it and counts it.
        await wait_until(lambda: a.readvertised >= 2)
        assert a.readvertised == 2  # one advert per address set, not one per poll


def test_the_allow_list_takes_names_or_addresses_and_default_skips_loopback() -> None:
    available = [("lo", "127.0.0.1"), ("eth0", "10.0.0.5"), ("wlan0", "10.1.0.7"),
                 ("eth0", "10.0.0.6")]
    assert select_addresses(available, None) == ("10.0.0.5", "10.0.0.6", "10.1.0.7")
    assert select_addresses(available, ["eth0"]) == ("10.0.0.5", "10.0.0.6")
    assert select_addresses(available, ["10.1.0.7", "lo"]) == ("10.1.0.7", "127.0.0.1")
    assert select_addresses(available, ["nope"]) == ()


# ---- an outsider on the LAN ----------------------------------------------------------


@dataclass
class Outsider:
    """A non-member that browses _meshd._tcp and records everything it can resolve."""

    zc: Zeroconf
    captured: dict[str, ServiceInfo] = field(default_factory=dict)


@contextmanager
def outsider_zeroconf() -> Iterator[Zeroconf]:
    zc = Zeroconf(interfaces=LOOPBACK, use_asyncio=False)
    try:
        yield zc
    finally:
        zc.close()


async def run_outsider(outsider: Outsider, *, task_status: trio.TaskStatus[None]) -> None:
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[str](1000)

    def handler(zeroconf: Zeroconf, service_type: str, name: str,
                state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            token.run_sync_soon(send.send_nowait, name)

    browser = await trio.to_thread.run_sync(
        lambda: ServiceBrowser(outsider.zc, SERVICE_TYPE, handlers=[handler]))
    task_status.started()
    try:
        async for name in receive:
            info = await trio.to_thread.run_sync(
                outsider.zc.get_service_info, SERVICE_TYPE, name, 3000, abandon_on_cancel=True)
            if info is not None:
                outsider.captured[name] = info
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(browser.cancel)


def identifiers(info: ServiceInfo) -> set[bytes]:
    """Everything in an advert that could name a device, the version and port excepted."""
    values = {info.name.encode(), info.name.split(".")[0].encode(), (info.server or "").encode()}
    values |= {v for k, v in info.properties.items() if k != b"v" and v is not None}
    return values


async def test_an_outsider_finds_no_identifier_that_repeats_across_windows() -> None:
    key, clock = os.urandom(32), WallClock()
    with outsider_zeroconf() as zc:
        outsider = Outsider(zc)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_outsider, outsider)
            async with discovery(b"A" * 8, 1111, lambda: [key], clock) as a, \
                    discovery(b"B" * 8, 2222, lambda: [key], clock) as b:
                assert a.advert is not None and b.advert is not None
                before = {a.advert.service_name, b.advert.service_name}
                await wait_until(lambda: before <= outsider.captured.keys())

                clock.now += WINDOW_S  # the next window: both re-advertise
                await wait_until(lambda: a.readvertised == 2 and b.readvertised == 2)
                after = {a.advert.service_name, b.advert.service_name}
                await wait_until(lambda: after <= outsider.captured.keys())
                # The members still recognise each other in the new window.
                assert b"B" * 8 in {s.tag_owner for s in [await next_sighting(a)]}
            nursery.cancel_scope.cancel()

    old = set().union(*(identifiers(outsider.captured[n]) for n in before))
    new = set().union(*(identifiers(outsider.captured[n]) for n in after))
    assert old and new
    assert not old & new, "an identifier repeats across windows"
    # Within one window the two devices share nothing either (no circle-wide tag).
    a_old, b_old = (identifiers(outsider.captured[n]) for n in sorted(before))
    assert not a_old & b_old


# ---- invitations and the loop ----------------------------------------------------------


async def test_an_invitation_is_found_by_its_nameplate_and_gone_once_withdrawn() -> None:
    clock = WallClock()
    async with discovery(b"A" * 8, 1111, lambda: [], clock) as a, \
            discovery(b"B" * 8, 2222, lambda: [], clock) as b:
        assert a.advert is None  # no circle yet: nothing but the invitation is advertised
        await a.advertise_invitation(42, 4242)
        assert await b.find_invitation(42, timeout=WAIT_S) == [("127.0.0.1", 4242)]
        await a.withdraw_invitation(42)
        # The goodbye reaches b's zeroconf thread asynchronously: until it has, b's cache may
        # still answer a new browse. Gone within the bound, or the withdrawal is broken.
        with trio.fail_after(WAIT_S):
            while await b.find_invitation(42, timeout=0.5) != []:
                pass


async def test_the_trio_loop_is_never_blocked_by_zeroconf() -> None:
    """Start, discover, invite and stop while a ticker measures the loop's worst lag.
    zeroconf's close alone blocks for ~0.5 s (goodbye broadcasts), so doing any of this on
    the trio thread would show."""
    key, clock = os.urandom(32), WallClock()
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        while True:
            before = trio.current_time()
            await trio.sleep(0.002)
            worst = max(worst, trio.current_time() - before - 0.002)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        async with discovery(b"A" * 8, 1111, lambda: [key], clock) as a, \
                discovery(b"B" * 8, 2222, lambda: [key], clock) as b:
            await next_sighting(a)
            await next_sighting(b)
            await a.advertise_invitation(7, 7777)
            assert await b.find_invitation(7, timeout=WAIT_S)
        nursery.cancel_scope.cancel()
    assert worst < 0.1, f"the trio loop stalled for {worst * 1000:.0f} ms"
