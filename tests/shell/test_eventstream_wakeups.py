"""What an event stream costs the daemon's trio thread while events flow (issue 20: CPU per
daemon; the soak keeps a GET /v1/events subscriber on each writing daemon).

Counted, never timed (the clock is trio's MockClock): the task steps of the stream's pump
per chunk it sends, while events are published steadily, faster than EVENT_GATHER_S apart,
as a daemon's commits are at 20 writes/s. On main (fb34a6b) the pump took 3 steps per
chunk: woken by the first event after a chunk, woken again at the end of the gather window,
and once more by a wake-up left set by the events gathered meanwhile (a wait that found
nothing to do). Here one step per chunk: the end of the gather window. Latency is kept: an
event after a quiet spell goes at once, and none waits more than EVENT_GATHER_S.
"""

from __future__ import annotations

from typing import Any

import h11
import trio
import trio.testing

from meshd.api import eventstream
from meshd.api.events import EventBus
from meshd.api.eventstream import EventStreaming
from meshd.api.values import EventStream

EVENTS = 200
EVENT_INTERVAL_S = 0.02  # 50 events/s: A's own and B's commits in the soak


class PumpSteps(trio.abc.Instrument):
    """Task steps of the event pump (its task's name ends with _pump_events)."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("_pump_events"):
            self.steps += 1


class Subscriber(EventStreaming):
    """The event-stream part of an API connection, with its sends recorded: (time, lines)."""

    def __init__(self, bus: EventBus, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.subscribe = bus.subscribe
        self.chunks: list[tuple[float, list[bytes]]] = []

    async def send(self, *events: Any) -> None:
        for event in events:
            if isinstance(event, h11.Data):
                self.chunks.append((trio.current_time(), bytes(event.data).splitlines()))
        # A cancel point with no schedule point, as the server's send of a chunk the socket
        # takes at once (connio.ConnectionIO.send_all).
        await trio.lowlevel.checkpoint_if_cancelled()


async def test_a_steady_flow_of_events_costs_the_pump_one_step_per_chunk(
        autojump_clock: trio.testing.MockClock) -> None:
    bus = EventBus()
    client, server = trio.testing.memory_stream_pair()
    subscriber = Subscriber(bus, server)
    counter = PumpSteps()
    published: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(subscriber.stream_events, EventStream(None))
        await trio.testing.wait_all_tasks_blocked()  # subscribed, the head sent
        assert bus.subscriber_count == 1
        trio.lowlevel.add_instrument(counter)
        for i in range(EVENTS):
            published.append(trio.current_time())
            bus.publish("entries", first_seq=i, last_seq=i)
            await trio.sleep(EVENT_INTERVAL_S)
        await trio.sleep(eventstream.EVENT_GATHER_S * 3)  # the last chunk goes, then quiet
        trio.lowlevel.remove_instrument(counter)
        counted_chunks = len(subscriber.chunks)
        lone_at = trio.current_time()  # after the flow, a lone event goes at once again
        bus.publish("entries", first_seq=EVENTS, last_seq=EVENTS)
        await trio.testing.wait_all_tasks_blocked()
        assert subscriber.chunks[-1][0] == lone_at and b'"first_seq":%d' % EVENTS in subscriber.chunks[-1][1][0]
        await client.aclose()  # the hang-up ends the stream
    chunks = [(at, lines) for at, lines in subscriber.chunks if lines != [b'{"type":"heartbeat"}']]
    sent_at = [at for at, lines in chunks for _ in lines]
    seqs = [int(line.split(b'"first_seq":')[1].split(b",")[0]) for _, lines in chunks for line in lines]
    print(f"{counted_chunks} chunks, pump steps {counter.steps} ({counter.steps / counted_chunks:.2f} per chunk)")
    assert seqs == list(range(EVENTS + 1))  # every event, once, in order
    # The first event goes at once; none waits more than the gather window.
    assert sent_at[0] == published[0]
    assert all(sent - at <= eventstream.EVENT_GATHER_S + 1e-9 for sent, at in zip(sent_at, [*published, lone_at], strict=True))
    # Gathered: one chunk per window, not one per event.
    assert counted_chunks <= EVENTS * EVENT_INTERVAL_S / eventstream.EVENT_GATHER_S + 2
    # One step per chunk (the end of its gather window), plus the quiet spell's start and end.
    # Main (fb34a6b): 2.9 per chunk.
    assert counter.steps <= counted_chunks + 2
