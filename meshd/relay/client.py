"""The device side of a relay that stays up: RelayClient keeps one RelaySession connected.

It reconnects with jittered exponential backoff (trying a relay's other addresses first),
re-registers with the current records, re-subscribes its watched mailboxes for hints (the
owner fetches what it can take) and exposes the session's requests, which wait for a
connection. Its sessions wait out "rate-limited" refusals (meshd/relay/session.py).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import trio

from ..excgroup import first_leaf
from ..net.transport import CONNECTION_ERRORS
from ..protocol.crypto import DHKeyPair, RandomSource
from ..protocol.relay import (
    MAX_FETCH_ITEMS,
    ROLE_OFFER,
    UNAVAILABLE,
    Envelopes,
    RelayError,
)
from ..quietlog import QuietLogger
from .address import RelayAddress, RelayAddressError
from .pipe import PipeStream
from .session import Registration, RelaySession, StoredBackup, open_relay_session
from .timers import MAX_BACKOFF_S, MIN_BACKOFF_S, RATE_LIMIT_PATIENCE_S

log = logging.getLogger(__name__)
quiet = QuietLogger(log)


class MailboxWatch:
    """Hints that a mailbox may hold something new, across reconnects (RelayClient.watch).

    The relay's pushes are hints only: the owner fetches what it can take (pull-based flow
    control, meshd/protocol/mailbox.py), so nothing pushed is buffered or dropped here, and a
    relay cannot make a device's memory grow. Each new session subscribes again and hints.
    """

    def __init__(self, client: RelayClient, mailbox: bytes) -> None:
        self.mailbox = mailbox
        self._client = client
        self._hinted = trio.Event()

    def hint(self) -> None:
        self._hinted.set()

    async def wait(self) -> None:
        """Until a push, or a new session, since the last wait()."""
        await self._hinted.wait()
        self._hinted = trio.Event()

    def close(self) -> None:
        if self._client._watches.get(self.mailbox) is self:  # noqa: SLF001
            del self._client._watches[self.mailbox]  # noqa: SLF001


class RelayClient:
    """Keeps one registered session to a relay; its requests wait for a connection.

    A relay may have several addresses (processes on one database, same key): when the
    session at one ends or cannot be opened, the client tries the next address at once,
    and backs off only once every address has failed in a row. Watched mailboxes are
    subscribed again (for hints) wherever it reconnects; their owners fetch from their
    cursors."""

    def __init__(
        self,
        address: RelayAddress | str,
        static: DHKeyPair,
        records: Callable[[], list[bytes]],
        *,
        rng: RandomSource = os.urandom,
        min_backoff_s: float = MIN_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        on_connected: Callable[[], None] | None = None,
        on_records: Callable[[list[bytes]], None] | None = None,
        incarnation: bytes | None = None,
        on_incarnation: Callable[[bytes | None, bytes], None] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        alternates: Sequence[RelayAddress | str] = (),
        token: bytes | None = None,
    ) -> None:
        self.address = RelayAddress.parse(address) if isinstance(address, str) else address
        self.addresses = [self.address]  # the one in use is self.address
        for alternate in alternates:
            self.add_alternate(alternate)
        # The relay storage's id last seen (protocol/relay.md "Incarnation"). A session that
        # registers with another one calls on_incarnation(previous, new) first (previous
        # None: the first one seen), so the owner resets what it keeps per relay (its
        # cursors, from id 0) before anything is read, and hints every watched mailbox.
        self.incarnation = incarnation
        self._on_incarnation = on_incarnation
        self._static = static
        self._records = records
        self.token = token  # the relay's enrolment token, if the owner gave one (never shown)
        self._rng = rng
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        # Called once each session is up: the records registered were read before the
        # handshake, so an owner whose circle changed meanwhile registers again.
        self._on_connected = on_connected
        self._on_records = on_records
        self._on_disconnected = on_disconnected  # called when a session that was up ends
        self._session: RelaySession | None = None
        self._connected = trio.Event()
        self._watches: dict[bytes, MailboxWatch] = {}
        self.last_error: str | None = None  # for status: why the last attempt or session ended
        self.connects = 0

    def add_alternate(self, address: RelayAddress | str) -> None:
        """Another address of the same relay (its key must be the same)."""
        parsed = RelayAddress.parse(address) if isinstance(address, str) else address
        if parsed.key != self.address.key:
            raise RelayAddressError(f"{parsed} has another key than {self.address}: "
                                    "not an address of the same relay")
        if parsed not in self.addresses:
            self.addresses.append(parsed)

    def _next_address(self) -> None:
        self.address = self.addresses[(self.addresses.index(self.address) + 1) % len(self.addresses)]

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def registration(self) -> Registration | None:
        return self._session.registration if self._session else None

    @property
    def session(self) -> RelaySession | None:
        """The live session, if connected (e.g. to register newer records at once)."""
        return self._session

    def describe(self) -> dict[str, Any]:
        return {"address": str(self.address), "connected": self.connected,
                "error": self.last_error,
                "incarnation": self.incarnation.hex() if self.incarnation else None}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        backoff = self._min_backoff_s
        jitter = random.Random(self._rng(8))
        failed_in_a_row = 0  # addresses that failed since the last session was up
        while True:
            try:
                async with open_relay_session(self.address, self._static, self._records(),
                                              on_push=self._route_push, rng=self._rng,
                                              on_records=self._on_records,
                                              rate_limit_patience_s=RATE_LIMIT_PATIENCE_S,
                                              token=self.token) as session:
                    self._session = session
                    if self._on_records is not None:
                        session.on_records = self._on_records
                    self._check_incarnation(session)
                    for watch in list(self._watches.values()):
                        await session.subscribe(watch.mailbox, notify=True)
                    self.connects += 1
                    self.last_error = None
                    backoff = self._min_backoff_s
                    failed_in_a_row = 0
                    self._connected.set()
                    log.info("relay %s:%d connected", self.address.host, self.address.port)
                    if self._on_connected is not None:
                        self._on_connected()
                    for watch in list(self._watches.values()):
                        watch.hint()  # a new session: fetch (and acknowledge) again
                    await session.wait_closed()
                    raise session.closed_error or RelayError(UNAVAILABLE, "session ended")
            except* CONNECTION_ERRORS as group:
                error = first_leaf(group)
                self.last_error = str(error)
                quiet.warning(("relay", self.address.host, type(error).__name__),
                              "relay %s:%d: %s", self.address.host, self.address.port, error)
            finally:
                was_up, self._session = self._session is not None, None
                if self._connected.is_set():
                    # Only a set event is replaced: tasks waiting in wait_connected() or
                    # _current() wait on the one they found, through any failed attempts
                    # (on to another address, or a backoff) until a session is up.
                    self._connected = trio.Event()
                if was_up and self._on_disconnected is not None:
                    self._on_disconnected()
            failed_in_a_row += 1
            self._next_address()
            if failed_in_a_row < len(self.addresses):
                continue  # another address of this relay may be up: try it now
            await trio.sleep(backoff * (0.5 + jitter.random()))
            backoff = min(self._max_backoff_s, backoff * 2)

    def _check_incarnation(self, session: RelaySession) -> None:
        new = session.registration.incarnation if session.registration else None
        if new is None or new == self.incarnation:
            return
        previous, self.incarnation = self.incarnation, new
        if previous is not None:
            log.warning("relay %s:%d is a new incarnation (its storage was wiped or replaced)",
                        self.address.host, self.address.port)
        if self._on_incarnation is not None:
            self._on_incarnation(previous, new)
        if previous is not None:
            for watch in self._watches.values():
                watch.hint()  # its ids start again: the owner reads from its (reset) cursor

    async def wait_connected(self) -> None:
        while self._session is None:
            await self._connected.wait()

    async def _current(self) -> RelaySession:
        while self._session is None:
            await self._connected.wait()
        return self._session

    async def watch(self, mailbox: bytes) -> MailboxWatch:
        """Hints for the mailbox (relay.subscribe with notify), now and after every reconnect.

        Raises RelayError if the relay refuses the subscription (e.g. too many)."""
        watch = MailboxWatch(self, mailbox)
        self._watches[mailbox] = watch
        if self._session is not None:
            try:
                await self._session.subscribe(mailbox, notify=True)
            except RelayError as err:
                if err.code != UNAVAILABLE:
                    watch.close()
                    raise
                # the next session subscribes it again
        watch.hint()
        return watch

    async def deposit(self, mailbox: bytes, envelope: bytes) -> int:
        return await (await self._current()).deposit(mailbox, envelope)

    async def fetch(self, mailbox: bytes, after: int = 0, limit: int = MAX_FETCH_ITEMS) -> Envelopes:
        return await (await self._current()).fetch(mailbox, after, limit)

    async def ack(self, mailbox: bytes, upto: int) -> None:
        await (await self._current()).ack(mailbox, upto)

    async def records(self) -> list[bytes]:
        return await (await self._current()).records()

    async def backup_get(self) -> StoredBackup | None:
        return await (await self._current()).backup_get()

    async def backup_put(self, expected_version: int, version: int, blob: bytes) -> None:
        await (await self._current()).backup_put(expected_version, version, blob)

    async def segment_put(self, segment_id: bytes, blob: bytes) -> None:
        await (await self._current()).segment_put(segment_id, blob)

    async def segment_get(self, segment_id: bytes) -> bytes | None:
        return await (await self._current()).segment_get(segment_id)

    async def segment_delete(self, segment_ids: list[bytes]) -> None:
        await (await self._current()).segment_delete(segment_ids)

    async def rendezvous(self, nameplate: int, role: str = ROLE_OFFER) -> PipeStream:
        """RelaySession.rendezvous on the current session (an inviter's offer). The offer
        lives as long as that session: "unavailable" means offer again once reconnected."""
        return await (await self._current()).rendezvous(nameplate, role)

    def _route_push(self, envelopes: Envelopes) -> None:
        # A hint whatever it carries: a relay that pushes envelopes themselves (one that
        # ignores notify) costs bandwidth, never memory; the owner fetches them again.
        watch = self._watches.get(envelopes.mailbox)
        log.debug("relay %s: hint for mailbox %s (%s)", self.address.host, envelopes.mailbox.hex()[:8],
                  "watched" if watch is not None else "not watched")
        if watch is not None:
            watch.hint()
