"""The event bus: subscribers get what they asked for; a slow one lags instead of blocking."""

from __future__ import annotations

import trio
import trio.testing

from meshd.api.events import EventBus


async def test_subscribers_receive_events_of_their_types_in_order() -> None:
    bus = EventBus()
    async with bus.subscribe(frozenset({"peer"})) as peers, bus.subscribe() as everything:
        bus.publish("peer.up", device="a")
        bus.publish("entry", stream="s")
        bus.publish("peer.down", device="a")
        assert [(await peers.next()).type for _ in range(2)] == ["peer.up", "peer.down"]
        assert [(await everything.next()).type for _ in range(3)] == ["peer.up", "entry", "peer.down"]
    assert bus.subscriber_count == 0


async def test_a_waiting_subscriber_wakes_on_publish() -> None:
    bus = EventBus()
    got = []
    async with bus.subscribe() as subscription:
        async with trio.open_nursery() as nursery:
            async def wait_one() -> None:
                got.append(await subscription.next())
            nursery.start_soon(wait_one)
            await trio.testing.wait_all_tasks_blocked()
            bus.publish("entry", n=1)
    assert got[0].data == {"n": 1}


async def test_a_slow_subscriber_lags_and_is_told_how_much() -> None:
    bus = EventBus(queue_events=3)
    async with bus.subscribe() as subscription:
        for n in range(10):
            bus.publish("entry", n=n)  # never blocks the publisher
        first = await subscription.next()
        assert (first.type, first.data) == ("lagged", {"missed": 7})
        assert [(await subscription.next()).data["n"] for _ in range(3)] == [7, 8, 9]
