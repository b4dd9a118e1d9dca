"""The relay path's receiving side: this device's mailboxes drained from a relay.

Per relay and per mailbox (one per epoch this device can read, newest first), fetch what
this device can take, open and check each envelope (current members only; the shared
SequenceTracker recognises copies, drops, replays and reorders), apply it (a log batch is
verified and committed in a worker thread, one envelope at a time), save the cursor
(with the tracker, one commit per fetched run, not one per envelope), then acknowledge: the relay deletes only what was applied (meshd/protocol/mailbox.py
decides). A failure to apply (a full disk) leaves the envelope at the relay, fetched again.
A log batch that arrives after a hole is kept durably (meshd/heldbatches.py) and the sender
is owed this device's version vector, which moves its deposit cursor back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgpack
import trio

from ..gapreport import GapReporter
from ..heldbatches import HeldBatches
from ..identity import fingerprint
from ..localerrors import LocalErrorBackoff
from ..protocol.circle import EpochKeys, epoch_keys
from ..protocol.envelope import (
    Arrival,
    EnvelopeReplayed,
    SequenceTracker,
    mailbox_id,
    open_envelope,
)
from ..protocol.errors import ProtocolError
from ..protocol.log import EntryRejected
from ..protocol.mailbox import FetchRequest, MailboxMisbehaved, MailboxReader
from ..protocol.relay import TOO_MANY_SUBSCRIPTIONS, UNAVAILABLE, RelayError
from ..quietlog import QuietLogger
from ..store.db import StoreError
from .client import RelayClient
from .deposits import REQUEST_TIMEOUT_S, Deposits
from .health import RelayHealth
from .linkhost import TRACKER_KEY, RelayHost, cursor_key, state_int

log = logging.getLogger("meshd.relay.links")
quiet = QuietLogger(log)

STORE_RETRY_S = 5.0
ACK_SHIELD_S = 1.0
# The relay allows 64 subscriptions per connection; older epochs than these are drained by
# nobody (their envelopes expire with the relay's TTL) — 32 epochs is years of rotations.
MAX_DRAINED_EPOCHS = 32


class Mailboxes:
    def __init__(self, daemon: RelayHost, deposits: Deposits, health: RelayHealth,
                 store_trouble: LocalErrorBackoff, refresh_circle: Callable[[str], None]) -> None:
        self._daemon = daemon
        self._deposits = deposits
        self.health = health
        self._store_trouble = store_trouble  # this device's storage failing: pause, log once
        self._refresh_circle = refresh_circle  # re-register at that relay, read its records
        self._tracker = self._load_tracker()
        self._tracker_saved = True  # False once an applied envelope's acceptance awaits a save
        self.drained: tuple[bytes, ...] = ()  # the mailbox set being drained
        self._mailboxes_at: tuple[tuple[bytes, ...], dict[bytes, EpochKeys]] = ((), {})
        # Batches that arrived before an earlier one (a hole): applied once the hole fills.
        self._held = HeldBatches(daemon.store)
        self._gaps = GapReporter()
        # Held while envelopes are applied (their batches commit in a worker thread) and while
        # the tracker is saved: one envelope at a time, in order, and never a save of a tracker
        # that accepted an envelope whose commit is still under way.
        self._applying = trio.Lock()

    def _load_tracker(self) -> SequenceTracker:
        raw = self._daemon.store.get_state(TRACKER_KEY)
        if not raw:
            return SequenceTracker()
        state = msgpack.unpackb(raw, strict_map_key=False)
        return SequenceTracker({bytes(k): (t, list(a)) for k, (t, a) in state.items()})

    def mine(self) -> dict[bytes, EpochKeys]:
        """This device's mailbox in each epoch it can read, newest first."""
        daemon = self._daemon
        if not daemon.is_member:
            return {}
        # Every epoch record, not number: a cut-off device may have sealed letters under a
        # record that lost to a concurrent one with the same number (protocol/circle.md).
        heads = daemon.circle.heads
        if self._mailboxes_at[0] != heads:  # unsealing every epoch's box per envelope is costly
            records = daemon.circle.readable_epoch_records(daemon.identity.noise)[:MAX_DRAINED_EPOCHS]
            mailboxes = {mailbox_id(keys, daemon.identity.signing.public): keys for _, keys in records}
            self._mailboxes_at = (heads, mailboxes)
        return dict(self._mailboxes_at[1])

    def _keys_for_epoch(self, number: int, mailbox: bytes = b"") -> EpochKeys | None:
        """The keys "epoch number" means: in a drained mailbox, the record that made it."""
        keys = self.mine().get(mailbox)
        if keys is not None and keys.number == number:
            return keys
        readable = self._daemon.circle.readable_epochs(self._daemon.identity.noise)
        return epoch_keys(number, readable[number]) if number in readable else None

    def _is_current_member(self, sign_key: bytes) -> bool:
        # Envelopes are accepted from current members only: a removed device still knows an
        # old epoch's key and could deposit where a relay has not yet heard of its removal.
        return self._daemon.circle.state.is_member(sign_key)

    async def drain(self, client: RelayClient) -> None:
        mailboxes = tuple(self.mine())
        self.drained = mailboxes
        async with trio.open_nursery() as nursery:
            for mailbox in mailboxes:
                nursery.start_soon(self._drain_one, client, mailbox)


    async def _drain_one(self, client: RelayClient, mailbox: bytes) -> None:
        """Fetch what this device can take, apply it, save the cursor, then acknowledge:
        the relay deletes only what was applied (meshd/protocol/mailbox.py decides)."""
        relay = str(client.address)
        cursor = cursor_key(relay, mailbox)
        reader = MailboxReader(state_int(self._daemon, cursor))
        log.debug("relay %s: draining mailbox %s from %d", relay, mailbox.hex()[:8], reader.applied_through)
        while True:
            try:
                watch = await client.watch(mailbox)
                break
            except RelayError as err:
                quiet.warning(("subscribe", relay, err.code), "relay %s refused a subscription: %s", relay, err)
                self._daemon.events.publish("relay.error", relay=relay, error=str(err))
                if err.code == TOO_MANY_SUBSCRIPTIONS and client.session is not None:
                    # The old epochs' mailboxes this session subscribed: a new one has none.
                    await client.session.aclose()
                await trio.sleep(STORE_RETRY_S)
        # The relay storage's id the reader's positions belong to (None: not known yet).
        incarnation = client.incarnation

        def same_incarnation() -> bool:
            """False (and the reader reset) if the relay registered with another storage
            id: its ids started again (_new_incarnation zeroed the stored cursor), so no
            position of the old one may be fetched after or acknowledged there."""
            nonlocal incarnation, saved
            if client.incarnation == incarnation:
                return True
            previous, incarnation = incarnation, client.incarnation
            if previous is None:
                return True  # the first one seen: the positions are its own
            reader.reset()
            saved = -1  # save the reset cursor
            return False

        try:
            session_seen = 0
            saved = reader.applied_through
            while True:
                await trio.lowlevel.checkpoint()  # every pass yields, whatever fails at once
                await client.wait_connected()
                if client.connects != session_seen:
                    session_seen = client.connects
                    reader.disconnected()
                same_incarnation()
                if (request := reader.next_fetch()) is not None:
                    items = await self._fetch(client, mailbox, reader, request)
                    log.debug("relay %s: fetched %s envelopes after %d", relay,
                              "no" if items is None else len(items), request.after)
                    if items is None:
                        continue
                    if not await self._apply_run(relay, mailbox, reader, items):
                        reader.failed()  # fetched again after the pause
                        await trio.sleep(max(self._store_trouble.delay, 1.0))
                        continue
                if not same_incarnation():
                    continue  # a reconnect during the fetch reached a new incarnation
                if reader.applied_through != saved or not self._tracker_saved:
                    try:
                        async with self._applying:
                            await self._save(cursor, reader.applied_through)
                        saved = reader.applied_through
                    except StoreError as err:
                        quiet.warning(("cursor", relay), "relay %s: cannot save the mailbox cursor: %s", relay, err)
                        await trio.sleep(STORE_RETRY_S)  # fetched again later; copies are recognised
                        continue
                if (upto := reader.ack_due()) is not None:
                    if await self._ack(client, mailbox, upto):
                        reader.ack_done(upto)
                    else:
                        reader.ack_failed(upto)
                if reader.idle:  # a failed ack is also tried again after the next hint
                    await watch.wait()
                    reader.hint()
        finally:
            watch.close()

    async def _save(self, cursor: str, applied_through: int) -> None:
        """The cursor and the tracker in one durable commit, before the acknowledgement: the
        tracker never runs behind what the relay may delete (a crash before it refetches the
        run, whose content applies again as copies). Called holding _applying, so two
        mailboxes' saves keep their order and nothing is applied meanwhile; the commit (an
        fsync, after a wait for the store's write lock) runs in a worker thread, so the trio
        thread keeps serving."""
        self._tracker_saved = True
        states = {TRACKER_KEY: msgpack.packb(self._tracker.state()),
                  cursor: str(applied_through).encode()}
        try:
            await trio.to_thread.run_sync(self._daemon.store.set_states, states)
        except BaseException:  # StoreError, or cancelled (committed or not): saved again later
            self._tracker_saved = False
            raise

    async def _fetch(self, client: RelayClient, mailbox: bytes, reader: MailboxReader,
                     request: FetchRequest) -> list[tuple[int, bytes]] | None:
        relay = str(client.address)
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                answer = await client.fetch(mailbox, request.after, request.limit)
            return reader.fetched(request, answer.items, answer.more)
        except (RelayError, trio.TooSlowError) as err:
            reader.fetch_failed(request)
            session = client.session
            if getattr(err, "code", "") == UNAVAILABLE and session is not None:
                # The connection is going: wait until the client noticed (a request on a
                # closed session fails at once, without a checkpoint).
                with trio.move_on_after(REQUEST_TIMEOUT_S):
                    await session.wait_closed()
            else:
                quiet.warning(("fetch", relay, str(err)), "relay %s: fetch failed: %s", relay, err)
                await trio.sleep(STORE_RETRY_S)
        except MailboxMisbehaved as err:
            log.warning("relay %s: %s; reconnecting", relay, err)
            self.health.misbehaved(relay, err.reason, str(err))
            if client.session is not None:
                await client.session.aclose()
            await trio.sleep(STORE_RETRY_S)
        return None

    async def _apply_run(self, relay: str, mailbox: bytes, reader: MailboxReader,
                         items: list[tuple[int, bytes]]) -> bool:
        """Apply fetched envelopes in order; False at the first that must be fetched again."""
        async with self._applying:
            for envelope_id, envelope in items:
                if not await self._receive_envelope(relay, mailbox, envelope):
                    return False
                reader.applied(envelope_id)
        return True

    async def _ack(self, client: RelayClient, mailbox: bytes, envelope_id: int) -> bool:
        # Shielded (briefly, so a stopping daemon is not held up): the content is applied and
        # the cursor saved; a cancellation now (a new epoch) would leave the envelopes taking
        # the circle's quota until their TTL. A lost ack is sent again after a reconnect.
        session = client.session
        if session is None:
            return False
        with trio.CancelScope(shield=True), trio.move_on_after(ACK_SHIELD_S):
            try:
                await session.ack(mailbox, envelope_id)
                return True
            except RelayError as err:
                quiet.warning(("ack", str(client.address)), "relay %s: ack failed: %s", client.address, err)
        return False

    async def _receive_envelope(self, relay: str, mailbox: bytes, envelope: bytes) -> bool:
        """Open, check and apply one envelope; False if it must be fetched again later."""
        daemon = self._daemon
        try:
            letter = open_envelope(envelope, mailbox=mailbox, keys_for_epoch=lambda n: self._keys_for_epoch(n, mailbox),
                                   is_sender_allowed=lambda key: True)  # membership: below
            if not self._is_current_member(letter.sender):
                if letter.sender in daemon.circle.state.removed:
                    # Sealed and signed by a device removed since (it still knew an old
                    # epoch's key): dropped, and not the relay's doing.
                    log.info("relay %s: ignored an envelope from a removed device", relay)
                    return True
                # Most likely a device added while this one was away: learn the records first
                # and fetch this envelope again.
                log.info("relay %s: envelope from a device not known yet; fetching the circle", relay)
                self._refresh_circle(relay)
                return False
            before = self._tracker.state()
            arrival = self._tracker.accept(letter.sender, letter.seq)
        except EnvelopeReplayed as err:
            log.debug("relay %s: duplicate envelope ignored: %s", relay, err)
            return True
        except ProtocolError as err:
            reason = getattr(err, "reason", type(err).__name__)
            log.warning("relay %s delivered an envelope that fails verification (%s): %s", relay, reason, err)
            daemon.count_error(f"envelope-{reason}")
            self.health.misbehaved(relay, reason, str(err))
            return True
        holes = self._tracker.missing(letter.sender)
        if arrival is Arrival.AHEAD:
            self.health.hole(relay, letter.sender, sum(hi - lo + 1 for lo, hi in holes))
        elif not holes:
            self.health.filled(letter.sender)
        if arrival is not Arrival.IN_ORDER or self._gaps.is_open(letter.sender):
            # One log line when a gap opens and one when it fills, not one per envelope.
            self._gaps.arrived(relay, letter.sender, letter.seq, holes)
        if arrival is not Arrival.IN_ORDER:
            daemon.events.publish("relay.sequence", relay=relay, sender=letter.sender.hex(),
                                  seq=letter.seq, arrival=arrival.value,
                                  missing=[list(h) for h in holes])
        held_before = letter.sender in self._held.authors()
        try:
            await self._apply(letter.sender, letter.payload, relay)
            if holes and held_before and self._heals(letter.sender, letter.payload):
                self._tracker.healed(letter.sender, letter.seq)
                self.health.filled(letter.sender)
                self._gaps.arrived(relay, letter.sender, letter.seq, [])  # "the gap filled"
            self._tracker_saved = False  # saved with the cursor, once per fetched run
            daemon.presence.relay_letter(letter.sender, relay)
        except StoreError as err:
            if self._store_trouble.failed(trio.current_time()):
                log.error("relay %s: cannot store what arrived (%s); will fetch it again in "
                          "%.0f s (repeats logged at most once a minute)", relay, err,
                          self._store_trouble.delay)
            else:
                log.debug("relay %s: cannot store what arrived: %s", relay, err)
            daemon.count_error("store")
            daemon.events.publish("store.error", error=str(err))
            self._tracker = SequenceTracker(before)  # forget the acceptance of what was not applied
            return False
        except BaseException:  # cancelled, perhaps before its commit: fetched again, applied or a copy
            self._tracker = SequenceTracker(before)
            raise
        return True

    def _heals(self, sender: bytes, payload: dict[str, Any]) -> bool:
        """Whether an envelope beyond a hole, just applied, healed it (its sender had log
        batches held back for a gap before): the sender's own log entries, and now nothing
        of theirs held. The sender deposits again from this device's vector, under new seqs,
        what a dropped envelope held; once that follows on, the hole's envelope is missing
        nothing. A hole that never held entries back stays shown (a relay dropped it)."""
        return (payload.get("t") == "log.entries" and payload.get("author") == sender
                and sender not in self._held.authors())

    async def _apply(self, sender: bytes, payload: dict[str, Any], relay: str) -> None:
        """Apply a verified member's payload; its own bad content is logged, never raised
        (StoreError propagates: the envelope is then fetched again)."""
        daemon = self._daemon
        kind = payload.get("t")
        try:
            if kind == "circle.records":
                records = payload.get("records")
                if not isinstance(records, list) or not all(isinstance(r, bytes) for r in records):
                    raise EntryRejected("malformed", "circle.records without a list of records")
                daemon.merge_circle_records(records, source=f"relay {relay}")
            elif kind == "log.entries":
                await self._ingest(sender, payload)
            elif kind == "relay.vector":
                self._deposits.vector_received(sender, payload.get("vector"))
            else:
                log.warning("relay %s: envelope from %s with unknown payload %r", relay,
                            fingerprint(sender), str(kind)[:64])
        except ProtocolError as err:
            log.warning("relay %s: envelope from %s rejected: %s", relay, fingerprint(sender), err)
            daemon.count_error(getattr(err, "reason", "rejected"))

    async def _ingest(self, sender: bytes, batch: dict[str, Any]) -> None:
        """Verify and commit a log batch in a worker thread (LogService.receive_message): a
        backlog's batches, or a wait on the store's write lock, never block the trio thread."""
        daemon = self._daemon
        try:
            await daemon.logs.receive_message(batch, daemon.is_author_allowed)
        except EntryRejected as err:
            if err.reason != "gap":
                raise
            # An envelope is missing (dropped by a relay, or still on another): keep this
            # batch durably (so its envelope may be acknowledged), and owe the sender our
            # vector so it deposits again from there.
            self._held.hold(batch)
            self._deposits.owe_vector(sender)
            return
        await self._release_held(bytes(batch["author"]))

    async def _release_held(self, author: bytes) -> None:
        await self._held.apply_following(author, self._daemon.logs, self._daemon.is_author_allowed)

    def holding(self) -> bool:
        return len(self._held) > 0

    async def release_all_held(self) -> None:
        """A hole before held batches may have filled by another path (LAN sync)."""
        async with self._applying:
            for author in self._held.authors():
                try:
                    await self._release_held(author)
                except StoreError as err:
                    log.debug("relay: held batches wait: %s", err)
                    break
