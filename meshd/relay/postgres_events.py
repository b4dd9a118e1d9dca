"""The PostgreSQL storage's event channel: how relay processes sharing one database learn
what the others committed (StorageEvent in backend.py).

A write transaction sends its events with NOTIFY (delivered only if it commits); every
process LISTENs on one channel and keeps the events whose origin token is not its own. A
lost listening connection is replaced, and the gap reported as a "resync" event.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg
import trio

from .backend import StorageEvent

log = logging.getLogger(__name__)

CHANNEL = "meshd_relay"


def encode_event(origin: str, event: StorageEvent) -> str:
    return ":".join((origin, event.kind, event.circle_id.hex(), event.mailbox.hex(),
                     str(event.delta)))


def decode_event(payload: str) -> tuple[str, StorageEvent] | None:
    try:
        origin, kind, circle_hex, mailbox_hex, delta = payload.split(":")
        return origin, StorageEvent(kind, bytes.fromhex(circle_hex), bytes.fromhex(mailbox_hex),
                                    int(delta))
    except ValueError:
        return None  # not ours (someone else NOTIFYing on the channel): ignored


def notify(db: psycopg.Connection[Any], origin: str, events: Sequence[StorageEvent]) -> None:
    """Send events with db's transaction: the other processes get them if it commits."""
    for event in events:
        db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, encode_event(origin, event)))


class EventListener:
    """The listening connection of one process (origin: its token)."""

    def __init__(self, dsn: str, origin: str) -> None:
        self.dsn = dsn
        self.origin = origin
        # Listening from the start: no change committed after this is missed. Raises
        # psycopg.Error on a wrong DSN (fast, before a pool's retries).
        self.connection: psycopg.Connection[Any] | None = self._listen()

    async def events(self) -> list[StorageEvent]:
        """Wait for the next events other processes committed (this process's own are
        left out). On a lost listening connection, reconnects and returns a "resync"."""
        while True:
            if self.connection is None:
                try:
                    self.connection = await trio.to_thread.run_sync(self._listen)
                except psycopg.Error as err:
                    log.warning("relay database: cannot listen for other processes' changes "
                                "(%s); retrying", type(err).__name__)
                    await trio.sleep(1)
                    continue
                return [StorageEvent("resync")]
            listener = self.connection
            try:
                await trio.lowlevel.wait_readable(listener.fileno())
                received = list(listener.notifies(timeout=0))
            except psycopg.Error as err:
                log.warning("relay database: listening connection lost (%s)", type(err).__name__)
                self.connection = None
                listener.close()
                continue
            events = [event for origin, event in filter(None, map(decode_event, (
                n.payload for n in received if n.channel == CHANNEL))) if origin != self.origin]
            if events:
                return events

    def _listen(self) -> psycopg.Connection[Any]:
        connection = psycopg.connect(self.dsn, autocommit=True)
        connection.execute(f"LISTEN {CHANNEL}")
        return connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
