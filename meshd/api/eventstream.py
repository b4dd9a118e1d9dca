"""GET /v1/events on an API connection: the daemon's events as a chunked NDJSON stream.

An EventStream result (routes.py) becomes this stream: subscribed before the response head
goes out, one chunk per burst of events, a heartbeat line when the stream is quiet, until
the client hangs up (its connection ends with the stream: "connection: close"). httpserver's
connection is an EventStreaming: it provides send (h11 events, one write), stream and
subscribe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import h11
import trio

from .events import Subscription
from .values import EventStream, jsonable

HEARTBEAT_SECONDS = 15.0
EVENT_GATHER_S = 0.1  # events this close to the last chunk of a stream go in the next one
RECEIVE_BYTES = 64 * 1024  # a read of what an events client sends (discarded)
HEARTBEAT_LINE = b'{"type":"heartbeat"}\n'
# One encoder for every line: json.dumps with separators builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode

Subscribe = Callable[[frozenset[str] | None], AbstractAsyncContextManager[Subscription]]


class ConnectionOver(Exception):
    """The connection is over (client gone, timed out, or must close): stop quietly."""


class EventStreaming:
    """The event stream's part of an API connection (httpserver._Connection)."""

    stream: trio.abc.ReceiveStream
    subscribe: Subscribe

    async def send(self, *events: Any) -> None:
        raise NotImplementedError  # the connection's: one write for all of events

    async def stream_events(self, wanted: EventStream) -> None:
        """Chunked NDJSON until the client hangs up; subscribed before the headers go out."""
        async with self.subscribe(wanted.types) as subscription:
            await self.send(h11.Response(status_code=200, headers=[
                ("content-type", "application/x-ndjson"), ("cache-control", "no-store"),
                ("connection", "close")]))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cancel_on_hangup, nursery.cancel_scope)
                nursery.start_soon(self._pump_events, subscription, nursery.cancel_scope)

    async def _pump_events(self, subscription: Subscription, scope: trio.CancelScope) -> None:
        # Heartbeats make a vanished client fail a send within HEARTBEAT_SECONDS, and tell a
        # client that a quiet stream is still alive. An event after a quiet spell goes at
        # once; those that follow within EVENT_GATHER_S of a chunk go together in the next
        # one (a burst of writes costs one send per subscriber, not one per event).
        # While events flow (a chunk had to wait for its window), the pump sleeps to the end
        # of the next window and takes what came: one wake-up per chunk, none per event (a
        # wake by the first event, then by the window's end, was two: issue 20). A window
        # that ends empty sends nothing and the pump waits for an event again, so a quiet
        # stream costs no wake-ups but its heartbeats.
        sent_at = -math.inf
        flowing = False
        try:
            while True:
                if flowing:
                    await trio.sleep_until(sent_at + EVENT_GATHER_S)
                    events = subscription.take_all()
                    if not events:
                        flowing = False
                        continue
                else:
                    events = []
                    with trio.move_on_after(HEARTBEAT_SECONDS):
                        events = [await subscription.next()]
                    if events:
                        if trio.current_time() < sent_at + EVENT_GATHER_S:
                            await trio.sleep_until(sent_at + EVENT_GATHER_S)
                            flowing = True
                        events += subscription.take_all()
                if events:
                    payload = b"".join(_encode(jsonable({"id": e.id, "type": e.type, "data": e.data})).encode()
                                       + b"\n" for e in events)
                else:
                    payload = HEARTBEAT_LINE
                await self.send(h11.Data(data=payload))
                sent_at = trio.current_time()
        except (ConnectionOver, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _cancel_on_hangup(self, scope: trio.CancelScope) -> None:
        try:
            while await self.stream.receive_some(RECEIVE_BYTES):
                pass  # nothing more is expected from an events client; discard it
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()
