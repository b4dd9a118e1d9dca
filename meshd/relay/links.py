"""The relay path: envelopes for devices the LAN cannot reach, the encrypted backup, recovery.

For every other device of the circle that has no direct connection, this device deposits its
own new log entries (and circle changes) as end-to-end encrypted envelopes into that device's
mailbox at every configured relay, and it drains its own mailboxes from whichever relay
answers. The same envelope goes to each relay with the same per-recipient sequence number,
so a recipient recognises duplicates and notices drops, replays and reorders (the shared
SequenceTracker). A recipient that finds a hole in an author's log answers with its version
vector, which moves the sender's deposit cursor back: nothing is lost while any relay or the
LAN path works. See protocol/relay.md ("device behaviour").

Ordering rule for the receive path: an envelope is acknowledged, and the replay tracker and
mailbox cursor saved, only after its content was applied; a failure to apply (a full disk)
leaves it at the relay to be fetched again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import trio

from ..backup import Backups
from ..errors import InvalidArgument, NotFound
from ..gapreport import GapReporter
from ..heldbatches import HeldBatches
from ..identity import fingerprint
from ..localerrors import LocalErrorBackoff
from ..net.logsync import EntryRejected
from ..protocol.circle import EpochKeys, epoch_keys
from ..protocol.envelope import (
    Arrival,
    EnvelopeReplayed,
    SequenceTracker,
    mailbox_id,
    open_envelope,
    seal_envelope,
)
from ..protocol.errors import ProtocolError
from ..protocol.mailbox import FetchRequest, MailboxMisbehaved, MailboxReader
from ..protocol.records import RecordRejected
from ..protocol.relay import TOO_MANY_SUBSCRIPTIONS, UNAVAILABLE, RelayError
from ..protocol.sync import parse_vector
from ..quietlog import QuietLogger
from ..store.db import StoreError
from .address import RelayAddress, RelayAddressError
from .client import RelayClient
from .health import RelayHealth

if TYPE_CHECKING:
    from ..api.events import EventBus
    from ..api.metrics import MeshdMetrics
    from ..config import Config
    from ..identity import DeviceIdentity
    from ..net.logsync import LogService
    from ..protocol.circle import Circle
    from ..protocol.crypto import RandomSource
    from ..store.db import Store

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

DEPOSIT_BATCH_BYTES = 256 * 1024
REQUEST_TIMEOUT_S = 10.0
BACKUP_DEBOUNCE_S = 2.0
STORE_RETRY_S = 5.0
# A round that left something undeposited (refused: rate-limited, quota; or no session) is
# tried again after this pause, doubling up to the cap, even if nothing else wakes the loop.
DEPOSIT_RETRY_S = 1.0
DEPOSIT_RETRY_CAP_S = 30.0
ACK_SHIELD_S = 1.0
# The relay allows 64 subscriptions per connection; older epochs than these are drained by
# nobody (their envelopes expire with the relay's TTL) — 32 epochs is years of rotations.
MAX_DRAINED_EPOCHS = 32
# Circle records are also sealed under this many epochs before the current one (those the
# recipient holds), so a member that missed a change reads it in a mailbox it drains.
ANNOUNCE_EPOCHS = 2
RELAYS_KEY = "relays"
TRACKER_KEY = "relay.tracker"
VECTOR_OWED_KEY = "relay.vector-owed"


class RelayPresence(Protocol):
    """Where relay links report letters and connections (presence.Presence)."""

    def relay_letter(self, sender: bytes, relay: str) -> None: ...
    def relay_connection_changed(self, relay: str, *, up: bool) -> None: ...


class ConnectedPeers(Protocol):
    """Which devices are reachable directly (peers.PeerManager)."""

    def connected_sign_keys(self) -> set[bytes]: ...


class RelayHost(Protocol):
    """What relay links need of the process that runs them (the daemon passes itself;
    relaylink.py never imports the daemon)."""

    @property
    def config(self) -> Config: ...
    @property
    def store(self) -> Store: ...
    @property
    def identity(self) -> DeviceIdentity: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def metrics(self) -> MeshdMetrics: ...
    @property
    def circle(self) -> Circle: ...
    @property
    def logs(self) -> LogService: ...
    @property
    def rng(self) -> RandomSource: ...
    @property
    def presence(self) -> RelayPresence: ...
    @property
    def peer_manager(self) -> ConnectedPeers: ...
    @property
    def is_member(self) -> bool: ...
    def count_error(self, kind: str) -> None: ...
    def merge_circle_records(self, records: list[bytes], *, source: str) -> None: ...
    def is_author_allowed(self, sign_key: bytes) -> bool: ...


def _state_int(daemon: RelayHost, key: str) -> int:
    raw = daemon.store.get_state(key)
    return int(raw.decode()) if raw else 0


def _set_int(daemon: RelayHost, key: str, value: int) -> None:
    daemon.store.set_state(key, str(value).encode())


class RelayLinks:
    def __init__(self, daemon: RelayHost) -> None:
        self._daemon = daemon
        stored = daemon.store.get_state(RELAYS_KEY)
        self._addresses: list[str] = list(daemon.config.relays)
        for address in msgpack.unpackb(stored) if stored else []:
            if address not in self._addresses:
                self._addresses.append(address)
        self._clients: dict[str, RelayClient] = {}
        self._link_scopes: dict[str, trio.CancelScope] = {}  # address -> its link, to remove it
        self._tracker = self._load_tracker()
        owed = daemon.store.get_state(VECTOR_OWED_KEY)
        self._vector_owed: set[bytes] = set(msgpack.unpackb(owed)) if owed else set()
        self._deposit_wakeup = trio.Event()
        self._backup_wakeup = trio.Event()
        self._drain_scopes: dict[str, trio.CancelScope] = {}
        self._drained: tuple[bytes, ...] = ()  # the mailbox set being drained
        self._mailboxes_at: tuple[tuple[bytes, ...], dict[bytes, EpochKeys]] = ((), {})
        self._circle_id = daemon.circle.circle_id  # the circle the sessions registered
        self._recipient_locks: dict[bytes, trio.Lock] = {}
        self._rewound: set[bytes] = set()  # recipients whose deposit cursor a vector moved back
        self._nursery: trio.Nursery | None = None
        # Batches that arrived before an earlier one (a hole): applied once the hole fills.
        self._held = HeldBatches(daemon.store)
        self._store_trouble = LocalErrorBackoff()  # this device's storage failing: pause, log once
        self.failures: dict[str, str] = {}  # relay -> last refusal, for status
        self.health = RelayHealth(daemon.events, daemon.metrics.relay_misbehaviour)
        self.backups = Backups(daemon, self.health.misbehaved)
        self._gaps = GapReporter()
        daemon.metrics.collectors.append(self.backups.update_age)

    def _load_tracker(self) -> SequenceTracker:
        raw = self._daemon.store.get_state(TRACKER_KEY)
        if not raw:
            return SequenceTracker()
        state = msgpack.unpackb(raw, strict_map_key=False)
        return SequenceTracker({bytes(k): (t, list(a)) for k, (t, a) in state.items()})

    # -- status and control ------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for address in self._addresses:
            client = self._clients.get(self._same_relay(address)[0])
            entry = client.describe() if client else {"address": address, "connected": False}
            if client is not None and len(client.addresses) > 1:
                # One relay, several addresses: the one its session uses is connected.
                entry.update(address=address, connected=client.connected and (
                    RelayAddress.parse(address) == client.address))
            if address in self.failures:
                entry["refused"] = self.failures[address]
            entry["backup"] = self.backups.describe(address)
            out.append(self.health.annotate(address, entry))
        return out

    def backlog(self) -> int:
        """Own entries not yet deposited for the members that get envelopes (status)."""
        tip = self._daemon.logs.version_vector().get(bytes(self._daemon.identity.signing.public), 0)
        try:
            return sum(max(0, tip - _state_int(self._daemon, self._deposited_key(recipient)))
                       for recipient in self._recipients())
        except StoreError:
            return -1

    async def add(self, address: str) -> dict[str, Any]:
        try:
            RelayAddress.parse(address)
        except RelayAddressError as err:
            raise InvalidArgument("bad-relay-address", str(err)) from None
        if address not in self._addresses:
            self._addresses.append(address)
            self._daemon.store.set_state(RELAYS_KEY, msgpack.packb(
                [a for a in self._addresses if a not in self._daemon.config.relays]))
            primary = self._same_relay(address)[0]
            if primary != address:  # another address of a relay in use: its client fails over
                if primary in self._clients:
                    self._clients[primary].add_alternate(address)
            else:
                self._spawn(self._link, address)
        return {"address": address, "relays": len(self._addresses)}

    def uses(self, address: str) -> bool:
        return address in self._addresses

    def remove(self, address: str) -> dict[str, Any]:
        """Stop using a relay: its connection closes and it is forgotten (unless the config
        file names it, which the caller checks first)."""
        if address not in self._addresses:
            raise NotFound("unknown-relay", f"this device does not use the relay {address}")
        self._addresses.remove(address)
        self._daemon.store.set_state(RELAYS_KEY, msgpack.packb(
            [a for a in self._addresses if a not in self._daemon.config.relays]))
        scope = self._link_scopes.pop(address, None)
        if scope is not None:
            scope.cancel()
        self._clients.pop(address, None)
        self.failures.pop(address, None)
        remaining = [a for a in self._addresses
                     if RelayAddress.parse(a).key == RelayAddress.parse(address).key]
        if scope is not None and remaining:
            # It was the address holding this relay's session: another address of the
            # same relay takes it over, so removing one process never drops the relay.
            self._spawn(self._link, remaining[0])
        return {"address": address, "relays": len(self._addresses)}

    def _same_relay(self, address: str) -> list[str]:
        """The addresses in the list with this address's key (one relay, several
        processes), in list order: the first has the client, the others are its alternates."""
        key = RelayAddress.parse(address).key
        return [a for a in self._addresses if RelayAddress.parse(a).key == key]

    def outbox(self) -> dict[str, dict[str, int]]:
        """Per other device (hex key): own entries not yet deposited for it (`behind`) and
        envelopes sealed for it so far (`envelopes`, its last per-recipient seq)."""
        daemon = self._daemon
        own = daemon.identity.signing.public
        tip = daemon.logs.version_vector().get(bytes(own), 0)
        return {d.sign_key.hex(): {
                    "behind": max(0, tip - _state_int(daemon, self._deposited_key(d.sign_key))),
                    "envelopes": _state_int(daemon, f"relay.seq.{d.sign_key.hex()}")}
                for d in daemon.circle.state.devices() if d.sign_key != own}

    def connected_clients(self) -> list[RelayClient]:
        return [client for client in self._clients.values() if client.connected]

    def circle_changed(self) -> None:
        circle_id = self._daemon.circle.circle_id
        mailboxes = tuple(self._my_mailboxes())
        if mailboxes != self._drained:
            # New mailbox ids (a new epoch): drain the new set.
            for scope in self._drain_scopes.values():
                scope.cancel()
        if circle_id != self._circle_id:
            # Another circle (this device joined one): a relay connection serves one circle,
            # so new sessions register it. Deposits in flight are retried (same seq).
            self._circle_id = circle_id
            for client in self._clients.values():
                if client.session is not None:
                    self._spawn(client.session.aclose)
        else:
            # The same circle (a device added, a new epoch): the sessions stay up, so a
            # deposit in flight is not cut off; they register the new records.
            for client in self._clients.values():
                if client.connected:
                    self._spawn(self._reregister, client)
        self._deposit_wakeup.set()
        self._backup_wakeup.set()

    def peer_synced(self, recipient: bytes, has_own: int) -> None:
        """The LAN sync with recipient ended having given it our log up to has_own: the relay
        path need not deposit that again."""
        key = self._deposited_key(recipient)
        try:
            if has_own > _state_int(self._daemon, key):
                _set_int(self._daemon, key, has_own)
            self._confirm(recipient, has_own)
        except StoreError as err:  # only an optimisation: deposits may repeat what it had
            log.warning("could not save the relay cursor: %s", err)

    def _confirm(self, recipient: bytes, has_own: int) -> None:
        """recipient is known to hold our log up to has_own (a LAN sync, its vector): what a
        wiped relay may have lost for it is only what comes after."""
        key = self._confirmed_key(recipient)
        if has_own > _state_int(self._daemon, key):
            _set_int(self._daemon, key, has_own)

    def _new_incarnation(self, address: str, previous: bytes | None, new: bytes) -> None:
        """The relay registered with another storage id than the one last seen: it was wiped
        or replaced. Its envelope ids start again and it holds none of our deposits or
        backups: reset what this device keeps for it and deposit there again (protocol/
        relay.md "Incarnation"). Not a rollback: the sequence tracker is kept, so nothing
        old it might serve is taken twice."""
        daemon = self._daemon
        try:
            daemon.store.set_state(self._incarnation_key(address), new)
            if previous is None:
                return  # the first contact: nothing kept for it yet
            for mailbox in self._my_mailboxes():
                _set_int(daemon, self._cursor_key(address, mailbox), 0)
            _set_int(daemon, self._backup_version_key(address), 0)
            self.backups.forget(address)  # its manifest and segments are gone with it
            own = bytes(daemon.identity.signing.public)
            for device in daemon.circle.state.devices():
                recipient = device.sign_key
                if recipient == own:
                    continue
                # What the relay held for it is lost; other relays hold the same envelopes
                # with the same seqs, so depositing again (new seqs, at every relay) only
                # makes duplicates the recipient ignores.
                key = self._deposited_key(recipient)
                confirmed = _state_int(daemon, self._confirmed_key(recipient))
                if _state_int(daemon, key) > confirmed:
                    _set_int(daemon, key, confirmed)
                    self._rewound.add(recipient)
                daemon.store.set_state(f"relay.records.{recipient.hex()}", b"")
        except StoreError as err:
            log.error("relay %s: could not reset the state kept for it: %s", address, err)
        log.warning("relay %s is a new incarnation (wiped or replaced): reading it from the "
                    "start and depositing there again", address)
        daemon.events.publish("relay.incarnation", relay=address, previous=previous.hex(),
                              incarnation=new.hex())
        self._deposit_wakeup.set()
        self._backup_wakeup.set()

    def peers_changed(self) -> None:
        self._deposit_wakeup.set()

    def local_commit(self) -> None:
        self._deposit_wakeup.set()
        self._backup_wakeup.set()

    def _spawn(self, task: Any, *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(task, *args)

    def _records_pushed(self, relay: str, records: list[bytes]) -> None:
        try:
            self._daemon.merge_circle_records(records, source=f"relay {relay}")
        except StoreError as err:
            log.error("relay %s: could not store pushed circle records: %s", relay, err)
        except RecordRejected as err:
            log.warning("relay %s pushed circle records that do not verify: %s", relay, err)
            self.health.misbehaved(relay, "bad-records", str(err))

    def _connected(self, client: RelayClient) -> None:
        self._daemon.presence.relay_connection_changed(str(client.address), up=True)
        self._spawn(self._reregister, client)
        self._deposit_wakeup.set()
        self._backup_wakeup.set()

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for address in self._addresses:
                if self._same_relay(address)[0] == address:
                    nursery.start_soon(self._link, address)
            nursery.start_soon(self._deposit_loop)
            nursery.start_soon(self._backup_loop)
            nursery.start_soon(self._watch_local_commits)
            task_status.started()

    async def register_everywhere(self) -> None:
        """Register the circle's records at every connected relay now (before stopping)."""
        async with trio.open_nursery() as nursery:
            for client in self._clients.values():
                if client.connected:
                    nursery.start_soon(self._reregister, client)

    def stop(self) -> None:
        """End every relay link (this device was removed from its circle: it dials no one)."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _watch_local_commits(self) -> None:
        seen = self._daemon.logs.changed.generation
        while True:
            seen = await self._daemon.logs.changed.wait(seen)
            self.local_commit()
            # A hole before held batches may have filled by another path (LAN sync).
            for author in self._held.authors():
                try:
                    self._release_held(author)
                except StoreError as err:
                    log.debug("relay: held batches wait: %s", err)
                    break

    async def _link(self, address: str) -> None:
        if address not in self._addresses:
            return  # removed before this task started
        daemon = self._daemon
        client = RelayClient(address, daemon.identity.noise, lambda: daemon.circle.records(),
                             rng=daemon.rng, on_connected=lambda: self._connected(client),
                             on_records=lambda records: self._records_pushed(address, records),
                             incarnation=daemon.store.get_state(self._incarnation_key(address)),
                             on_incarnation=lambda previous, new: self._new_incarnation(
                                 address, previous, new),
                             on_disconnected=lambda: daemon.presence.relay_connection_changed(
                                 str(client.address), up=False),
                             alternates=self._same_relay(address)[1:])
        self._clients[address] = client
        with trio.CancelScope() as link_scope:  # cancelled by remove()
            self._link_scopes[address] = link_scope
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run)
                while True:
                    # Drain this epoch's mailboxes until the circle changes (a new epoch means
                    # new mailbox ids) or the store fails, then start over.
                    with trio.CancelScope() as scope:
                        self._drain_scopes[address] = scope
                        await self._drain_mailboxes(client)
                        await trio.sleep_forever()
                    await trio.lowlevel.checkpoint()
        self._drain_scopes.pop(address, None)

    async def _reregister(self, client: RelayClient) -> None:
        session = client.session
        if session is None:
            return
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                registered = self._daemon.circle.records()
                await session.register(registered)
                # What the others changed while this device was away (a removal, an epoch).
                held = await session.records()
                self._records_pushed(str(client.address), held)
                if missing := set(registered) - set(held):
                    # The relay merged these before answering: serving a set without them is
                    # withholding (e.g. a removal), whatever the other relays say.
                    log.error("relay %s withholds %d circle record(s) this device registered",
                              client.address, len(missing))
                    self._daemon.events.publish("relay.misbehaved", relay=str(client.address),
                                                reason="withheld-records",
                                                detail=f"{len(missing)} registered record(s) missing")
        except (RelayError, trio.TooSlowError) as err:
            # e.g. this device joined another circle: a fresh session registers afresh.
            log.info("relay %s: re-registering failed (%s); reconnecting", client.address, err)
            await session.aclose()

    # -- receiving -------------------------------------------------------------------------------

    def _my_mailboxes(self) -> dict[bytes, EpochKeys]:
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
        keys = self._my_mailboxes().get(mailbox)
        if keys is not None and keys.number == number:
            return keys
        readable = self._daemon.circle.readable_epochs(self._daemon.identity.noise)
        return epoch_keys(number, readable[number]) if number in readable else None

    def _is_current_member(self, sign_key: bytes) -> bool:
        # Envelopes are accepted from current members only: a removed device still knows an
        # old epoch's key and could deposit where a relay has not yet heard of its removal.
        return self._daemon.circle.state.is_member(sign_key)

    async def _drain_mailboxes(self, client: RelayClient) -> None:
        mailboxes = tuple(self._my_mailboxes())
        self._drained = mailboxes
        async with trio.open_nursery() as nursery:
            for mailbox in mailboxes:
                nursery.start_soon(self._drain_one, client, mailbox)

    @staticmethod
    def _cursor_key(relay: str, mailbox: bytes) -> str:
        return f"relay.cursor.{relay}.{mailbox.hex()}"

    @staticmethod
    def _incarnation_key(relay: str) -> str:
        return f"relay.incarnation.{relay}"

    @staticmethod
    def _backup_version_key(relay: str) -> str:
        return f"relay.backup-version.{relay}"

    async def _drain_one(self, client: RelayClient, mailbox: bytes) -> None:
        """Fetch what this device can take, apply it, save the cursor, then acknowledge:
        the relay deletes only what was applied (meshd/protocol/mailbox.py decides)."""
        relay = str(client.address)
        cursor_key = self._cursor_key(relay, mailbox)
        reader = MailboxReader(_state_int(self._daemon, cursor_key))
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
                    if not self._apply_run(relay, mailbox, reader, items):
                        reader.failed()  # fetched again after the pause
                        await trio.sleep(max(self._store_trouble.delay, 1.0))
                        continue
                if not same_incarnation():
                    continue  # a reconnect during the fetch reached a new incarnation
                if reader.applied_through != saved:
                    try:
                        _set_int(self._daemon, cursor_key, reader.applied_through)
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

    def _apply_run(self, relay: str, mailbox: bytes, reader: MailboxReader,
                   items: list[tuple[int, bytes]]) -> bool:
        """Apply fetched envelopes in order; False at the first that must be fetched again."""
        for envelope_id, envelope in items:
            if not self._receive_envelope(relay, mailbox, envelope):
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

    def _receive_envelope(self, relay: str, mailbox: bytes, envelope: bytes) -> bool:
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
                for client in self._clients.values():
                    if str(client.address) == relay:
                        self._spawn(self._reregister, client)
                return False
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
        try:
            self._apply(letter.sender, letter.payload, relay)
            daemon.store.set_state(TRACKER_KEY, msgpack.packb(self._tracker.state()))
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
            try:
                self._tracker = self._load_tracker()  # forget the acceptance of what was not applied
            except StoreError:
                pass  # keep the in-memory one; at worst a copy is later taken for a replay
            return False
        return True

    def _apply(self, sender: bytes, payload: dict[str, Any], relay: str) -> None:
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
                self._ingest(sender, payload)
            elif kind == "relay.vector":
                self._vector_received(sender, payload.get("vector"))
            else:
                log.warning("relay %s: envelope from %s with unknown payload %r", relay,
                            fingerprint(sender), str(kind)[:64])
        except ProtocolError as err:
            log.warning("relay %s: envelope from %s rejected: %s", relay, fingerprint(sender), err)
            daemon.count_error(getattr(err, "reason", "rejected"))

    def _vector_received(self, sender: bytes, vector: Any) -> None:
        own = bytes(self._daemon.identity.signing.public)
        have = parse_vector(vector).get(own, 0)  # EntryRejected("malformed") for a bad one
        self._confirm(sender, have)
        key = self._deposited_key(sender)
        if have < _state_int(self._daemon, key):
            _set_int(self._daemon, key, have)
            self._rewound.add(sender)
        self._deposit_wakeup.set()

    def _ingest(self, sender: bytes, batch: dict[str, Any]) -> None:
        daemon = self._daemon
        try:
            daemon.logs.ingest(batch, daemon.is_author_allowed)
        except EntryRejected as err:
            if err.reason != "gap":
                raise
            # An envelope is missing (dropped by a relay, or still on another): keep this
            # batch durably (so its envelope may be acknowledged), and owe the sender our
            # vector so it deposits again from there.
            self._held.hold(batch)
            self._owe_vector(sender)
            return
        self._release_held(bytes(batch["author"]))

    def _release_held(self, author: bytes) -> None:
        """Apply held batches of author that now follow on (StoreError propagates)."""
        daemon = self._daemon
        while True:
            ready = self._held.release(author, daemon.logs.version_vector().get(author, 0))
            if not ready:
                return
            for slot, batch in ready:
                try:
                    daemon.logs.ingest(batch, daemon.is_author_allowed)
                except EntryRejected as err:
                    if err.reason == "gap":
                        return  # an earlier held batch was dropped: the resend brings it
                    log.warning("relay: a held batch from %s was rejected: %s", fingerprint(author), err)
                self._held.forget(slot)

    def _owe_vector(self, sender: bytes) -> None:
        self._vector_owed.add(sender)
        self._daemon.store.set_state(VECTOR_OWED_KEY, msgpack.packb(sorted(self._vector_owed)))
        self._deposit_wakeup.set()

    # -- depositing -------------------------------------------------------------------------------

    def _deposited_key(self, recipient: bytes) -> str:
        return f"relay.deposited.{recipient.hex()}"

    def _confirmed_key(self, recipient: bytes) -> str:
        return f"relay.confirmed.{recipient.hex()}"

    def _recipients(self) -> list[bytes]:
        """Devices with no direct connection: they get envelopes."""
        daemon = self._daemon
        own = daemon.identity.signing.public
        connected = daemon.peer_manager.connected_sign_keys()
        return [d.sign_key for d in daemon.circle.state.devices()
                if d.sign_key != own and d.sign_key not in connected]

    async def _deposit_loop(self) -> None:
        daemon = self._daemon
        retry_s = DEPOSIT_RETRY_S
        while True:
            self._deposit_wakeup = trio.Event()
            done = True
            if self._clients and daemon.is_member:
                try:
                    done = await self._deposit_round()
                except StoreError as err:
                    if self._store_trouble.failed(trio.current_time()):
                        log.error("relay deposits paused: %s (repeats logged at most once a minute)", err)
                    await trio.sleep(self._store_trouble.delay)
                    continue
            if done:
                retry_s = DEPOSIT_RETRY_S
                await self._deposit_wakeup.wait()
            else:
                # Something was left (e.g. the relay rate-limited the last deposit): no
                # later commit may come to wake the loop, so try again after a pause.
                with trio.move_on_after(retry_s):
                    await self._deposit_wakeup.wait()
                retry_s = min(DEPOSIT_RETRY_CAP_S, retry_s * 2)

    async def _deposit_round(self) -> bool:
        """Deposit what each recipient lacks; True if nothing was left undeposited."""
        daemon = self._daemon
        done = True
        own = bytes(daemon.identity.signing.public)
        recipients = self._recipients()
        for sender in sorted(self._vector_owed):
            if not daemon.circle.state.is_member(sender) or sender not in recipients or \
                    await self._deposit_letter(sender, {"t": "relay.vector",
                                                        "vector": daemon.logs.version_vector()}):
                self._vector_owed.discard(sender)
                daemon.store.set_state(VECTOR_OWED_KEY, msgpack.packb(sorted(self._vector_owed)))
            else:
                done = False
        tip = daemon.logs.version_vector().get(own, 0)
        for recipient in recipients:
            records_key = f"relay.records.{recipient.hex()}"
            heads = msgpack.packb(sorted(daemon.circle.heads))
            if daemon.store.get_state(records_key) != heads:
                if await self._announce(recipient):
                    daemon.store.set_state(records_key, heads)
                else:
                    done = False
            self._rewound.discard(recipient)
            while (deposited := _state_int(daemon, self._deposited_key(recipient))) < tip:
                batch = daemon.logs.batch_since(own, deposited, DEPOSIT_BATCH_BYTES)
                if batch is None:
                    break
                if not await self._deposit_letter(recipient, batch):
                    done = False
                    break
                if recipient in self._rewound:
                    break  # a vector moved the cursor back meanwhile: start again from there
                _set_int(daemon, self._deposited_key(recipient), batch["head"]["seq"])
        return done

    async def _announce(self, recipient: bytes) -> bool:
        """The circle's records for recipient, under the current epoch and the ones before it
        that it holds: a recipient that missed a change (a relay withheld it) still reads it."""
        daemon = self._daemon
        info = daemon.circle.state.members.get(recipient)
        try:
            older = daemon.circle.announcement_keys(daemon.identity.noise, info.dh_key if info else b"",
                                                    ANNOUNCE_EPOCHS)[:-1]
        except ProtocolError as err:
            quiet.warning(("epoch",), "cannot announce: %s", err)
            return False
        letter = {"t": "circle.records", "records": daemon.circle.records()}
        for keys in older:
            await self._deposit_letter(recipient, letter, keys)
        return await self._deposit_letter(recipient, letter)

    async def _deposit_letter(self, recipient: bytes, payload: dict[str, Any],
                              keys: EpochKeys | None = None) -> bool:
        """Seal payload for recipient (under the current epoch unless keys are given) and
        deposit it at every connected relay; True if any took it.

        Sequence numbers are never burned nor reused: an envelope whose deposit had no
        answer (the connection went; the relay may or may not have stored it) is kept in
        the store and deposited again, same bytes and seq, until a relay confirms it and
        before anything newer for that recipient (a copy is recognised by its seq); one
        that certainly reached no relay (refused everywhere, or no relay connected) gives
        its seq back.
        """
        daemon = self._daemon
        try:
            keys = keys or daemon.circle.current_keys(daemon.identity.noise)
        except ProtocolError as err:
            quiet.warning(("epoch",), "cannot deposit: %s", err)
            return False
        lock = self._recipient_locks.setdefault(recipient, trio.Lock())
        async with lock:  # one letter at a time per recipient: seqs arrive in order
            seq_key = f"relay.seq.{recipient.hex()}"
            unsent_key = f"relay.unsent.{recipient.hex()}"
            unsent = daemon.store.get_state(unsent_key)
            if unsent:
                seq, mailbox, envelope = msgpack.unpackb(unsent)
                if await self._deposit_everywhere(mailbox, envelope) != "stored":
                    # Still unconfirmed: a relay may hold it, so its seq is never reused.
                    return False
                daemon.store.set_state(unsent_key, b"")
            mailbox = mailbox_id(keys, recipient)
            # Reserved before any await: a seq is never used twice (a reuse would make the
            # recipient drop a letter as a replay).
            seq = _state_int(daemon, seq_key) + 1
            _set_int(daemon, seq_key, seq)
            envelope = seal_envelope(keys=keys, mailbox=mailbox, signer=daemon.identity.signing, seq=seq,
                                     payload=payload, rng=daemon.rng)
            outcome = await self._deposit_everywhere(mailbox, envelope)
            if outcome == "uncertain":
                daemon.store.set_state(unsent_key, msgpack.packb([seq, mailbox, envelope]))
            elif outcome == "refused":
                # Certainly stored nowhere: give the seq back, so the recipient sees no hole
                # (this task still holds the recipient's lock, so no later seq exists).
                _set_int(daemon, seq_key, seq - 1)
            return outcome == "stored"

    async def _deposit_everywhere(self, mailbox: bytes, envelope: bytes) -> str:
        """Deposit at every connected relay: "stored" (any took it), "uncertain" (none did,
        and some may have without answering), or "refused" (certainly stored nowhere)."""
        daemon = self._daemon
        accepted = uncertain = 0

        async def deposit_at(address: str, client: RelayClient) -> None:
            nonlocal accepted, uncertain
            session = client.session  # this session or none: never wait for a reconnect
            if session is None:
                return
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    await session.deposit(mailbox, envelope)
                accepted += 1
                self.failures.pop(address, None)
                daemon.metrics.relay_deposits.inc(result="ok")
            except (RelayError, trio.TooSlowError) as err:
                # No answer: the relay may have stored it anyway.
                uncertain += isinstance(err, trio.TooSlowError) or getattr(err, "code", "") == UNAVAILABLE
                self.failures[address] = str(err)
                daemon.metrics.relay_deposits.inc(result="failed")
                quiet.warning(("deposit", address, str(err)), "relay %s refused a deposit: %s", address, err)
                daemon.events.publish("relay.error", relay=address, error=str(err))

        async with trio.open_nursery() as nursery:
            for address, client in list(self._clients.items()):
                nursery.start_soon(deposit_at, address, client)
        if accepted:
            return "stored"
        return "uncertain" if uncertain else "refused"

    # -- backup --------------------------------------------------------------------------------------

    async def _backup_loop(self) -> None:
        # meshd/backup.py does the work; a failing relay waits for its backoff, not the next change.
        while True:
            await self._backup_wakeup.wait()
            await trio.sleep(BACKUP_DEBOUNCE_S)  # debounce: one backup per burst of changes
            self._backup_wakeup = trio.Event()
            if not self._daemon.is_member:
                continue
            for address, client in list(self._clients.items()):
                if client.connected and not self.backups.due(address):
                    await self.backups.upload(address, client)
                if (delay := self.backups.wake_in(address)) is not None:
                    self._spawn(self._wake_backup_after, delay)

    async def _wake_backup_after(self, delay: float) -> None:
        await trio.sleep(delay)
        self._backup_wakeup.set()

