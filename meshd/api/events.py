"""The daemon's event bus: what the local API's /v1/events stream and the tests watch.

Publishers (sync, peers, circle) call publish() synchronously; it never blocks and never
raises, because a slow app must not stall sync. Each subscriber has a bounded queue; when it
overflows, the subscriber's oldest events are dropped and it receives one `lagged` event
saying how many it missed, so it knows to re-read state instead of trusting the stream.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

SUBSCRIBER_QUEUE_EVENTS = 1024


@dataclass(frozen=True, slots=True)
class Event:
    """One event: a type such as 'entry', 'peer.up', 'member.removed', and JSON-able data."""

    type: str
    data: dict[str, Any]
    id: int = 0


@dataclass(eq=False)
class Subscription:
    types: frozenset[str] | None
    queue: deque[Event] = field(default_factory=deque)
    dropped: int = 0
    wakeup: trio.Event = field(default_factory=trio.Event)

    def wants(self, event: Event) -> bool:
        return self.types is None or event.type in self.types or event.type.split(".")[0] in self.types

    async def next(self) -> Event:
        while not self.queue:
            await self.wakeup.wait()
            self.wakeup = trio.Event()
        if self.dropped:
            missed, self.dropped = self.dropped, 0
            return Event("lagged", {"missed": missed})
        return self.queue.popleft()

    def take_all(self) -> list[Event]:
        """What is queued now (a `lagged` event first if some were dropped), without waiting."""
        if self.wakeup.is_set():  # for the events taken here: a next() must not wake for them
            self.wakeup = trio.Event()
        out = [Event("lagged", {"missed": self.dropped})] if self.dropped else []
        self.dropped = 0
        out.extend(self.queue)
        self.queue.clear()
        return out

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            yield await self.next()


class EventBus:
    def __init__(self, queue_events: int = SUBSCRIBER_QUEUE_EVENTS) -> None:
        self._subscriptions: set[Subscription] = set()
        self._queue_events = queue_events
        self._ids = itertools.count(1)

    def publish(self, type: str, **data: Any) -> None:
        event = Event(type, data, next(self._ids))
        for subscription in self._subscriptions:
            if not subscription.wants(event):
                continue
            if len(subscription.queue) >= self._queue_events:
                subscription.queue.popleft()
                subscription.dropped += 1
            subscription.queue.append(event)
            subscription.wakeup.set()

    @asynccontextmanager
    async def subscribe(self, types: frozenset[str] | None = None) -> AsyncIterator[Subscription]:
        """Events published from now on, until the block exits."""
        subscription = Subscription(types)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)
