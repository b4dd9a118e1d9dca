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
from collections import deque
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from .api import ApiError
from .backup import BackupFailed, Backups
from .gapreport import GapReporter
from .logsync import EntryRejected
from .protocol.backupset import Manifest
from .protocol.circle import Circle, CircleOperationError, EpochKeys, RecordRejected, epoch_keys
from .protocol.crypto import short_key
from .protocol.envelope import (
    Arrival,
    EnvelopeReplayed,
    SequenceTracker,
    mailbox_id,
    open_envelope,
    seal_envelope,
)
from .protocol.errors import ProtocolError
from .protocol.recovery import recovery_member
from .protocol.relay import RelayError
from .quietlog import QuietLogger
from .relay.client import RelayAddress, RelayAddressError, RelayClient, open_relay_session
from .restore import fetch_manifest, restore_logs
from .store import StoreError

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

DEPOSIT_BATCH_BYTES = 256 * 1024
REQUEST_TIMEOUT_S = 10.0
BACKUP_DEBOUNCE_S = 2.0
STORE_RETRY_S = 5.0
ACK_SHIELD_S = 1.0
# The relay allows 64 subscriptions per connection; older epochs than these are drained by
# nobody (their envelopes expire with the relay's TTL) — 32 epochs is years of rotations.
MAX_DRAINED_EPOCHS = 32
MAX_PENDING_BATCHES = 256
RELAYS_KEY = "relays"
TRACKER_KEY = "relay.tracker"
VECTOR_OWED_KEY = "relay.vector-owed"


def _state_int(daemon: Daemon, key: str) -> int:
    raw = daemon.store.get_state(key)
    return int(raw.decode()) if raw else 0


def _set_int(daemon: Daemon, key: str, value: int) -> None:
    daemon.store.set_state(key, str(value).encode())


class RelayLinks:
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        stored = daemon.store.get_state(RELAYS_KEY)
        self._addresses: list[str] = list(daemon.config.relays)
        for address in msgpack.unpackb(stored) if stored else []:
            if address not in self._addresses:
                self._addresses.append(address)
        self._clients: dict[str, RelayClient] = {}
        self._tracker = self._load_tracker()
        owed = daemon.store.get_state(VECTOR_OWED_KEY)
        self._vector_owed: set[bytes] = set(msgpack.unpackb(owed)) if owed else set()
        self._deposit_wakeup = trio.Event()
        self._backup_wakeup = trio.Event()
        self._drain_scopes: dict[str, trio.CancelScope] = {}
        self._drained: tuple[bytes, ...] = ()  # the mailbox set being drained
        self._recipient_locks: dict[bytes, trio.Lock] = {}
        self._rewound: set[bytes] = set()  # recipients whose deposit cursor a vector moved back
        self._nursery: trio.Nursery | None = None
        # Batches that arrived before an earlier one (a hole): applied once the hole fills.
        self._pending: deque[tuple[bytes, dict[str, Any]]] = deque(maxlen=MAX_PENDING_BATCHES)
        self.failures: dict[str, str] = {}  # relay -> last refusal, for status
        self.backups = Backups(daemon)
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
            client = self._clients.get(address)
            entry = client.describe() if client else {"address": address, "connected": False}
            if address in self.failures:
                entry["refused"] = self.failures[address]
            entry["backup"] = self.backups.describe(address)
            out.append(entry)
        return out

    async def add(self, address: str) -> dict[str, Any]:
        try:
            RelayAddress.parse(address)
        except RelayAddressError as err:
            raise ApiError(400, "bad-relay-address", str(err)) from None
        if address not in self._addresses:
            self._addresses.append(address)
            self._daemon.store.set_state(RELAYS_KEY, msgpack.packb(
                [a for a in self._addresses if a not in self._daemon.config.relays]))
            self._spawn(self._link, address)
        return {"address": address, "relays": len(self._addresses)}

    def connected_clients(self) -> list[RelayClient]:
        return [client for client in self._clients.values() if client.connected]

    def circle_changed(self) -> None:
        mailboxes = tuple(self._my_mailboxes())
        if mailboxes != self._drained:
            # New mailbox ids (a new epoch): drain the new set on fresh sessions, so the
            # relay forgets the old subscriptions rather than accumulating them.
            for scope in self._drain_scopes.values():
                scope.cancel()
            for client in self._clients.values():
                if client.session is not None:
                    self._spawn(client.session.aclose)
        else:
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
        except StoreError as err:  # only an optimisation: deposits may repeat what it had
            log.warning("could not save the relay cursor: %s", err)

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
            self._daemon.events.publish("relay.misbehaved", relay=relay, reason="bad-records", detail=str(err))

    def _connected(self, client: RelayClient) -> None:
        self._spawn(self._reregister, client)
        self._deposit_wakeup.set()
        self._backup_wakeup.set()

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for address in self._addresses:
                nursery.start_soon(self._link, address)
            nursery.start_soon(self._deposit_loop)
            nursery.start_soon(self._backup_loop)
            nursery.start_soon(self._watch_local_commits)
            task_status.started()

    async def _watch_local_commits(self) -> None:
        seen = self._daemon.logs.changed.generation
        while True:
            seen = await self._daemon.logs.changed.wait(seen)
            self.local_commit()

    async def _link(self, address: str) -> None:
        daemon = self._daemon
        client = RelayClient(address, daemon.identity.noise, lambda: daemon.circle.records(),
                             rng=daemon.rng, on_connected=lambda: self._connected(client),
                             on_records=lambda records: self._records_pushed(address, records))
        self._clients[address] = client
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

    async def _reregister(self, client: RelayClient) -> None:
        session = client.session
        if session is None:
            return
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await session.register(self._daemon.circle.records())
                # What the others changed while this device was away (a removal, an epoch).
                self._records_pushed(str(client.address), await session.records())
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
        readable = daemon.circle.readable_epochs(daemon.identity.noise)
        out = {}
        for number in sorted(readable, reverse=True)[:MAX_DRAINED_EPOCHS]:
            keys = epoch_keys(number, readable[number])
            out[mailbox_id(keys, daemon.identity.signing.public)] = keys
        return out

    def _keys_for_epoch(self, number: int) -> EpochKeys | None:
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

    async def _drain_one(self, client: RelayClient, mailbox: bytes) -> None:
        relay = str(client.address)
        cursor_key = f"relay.cursor.{relay}.{mailbox.hex()}"
        while True:
            try:
                subscription = await client.subscribe(mailbox, _state_int(self._daemon, cursor_key))
            except RelayError as err:
                quiet.warning(("subscribe", relay, err.code), "relay %s refused a subscription: %s", relay, err)
                self._daemon.events.publish("relay.error", relay=relay, error=str(err))
                await trio.sleep(STORE_RETRY_S * 6)
                continue
            try:
                async for envelope_id, envelope in subscription:  # RelayError: handled below
                    if not self._receive_envelope(relay, mailbox, envelope):
                        break  # not applied: fetch it again later
                    try:
                        _set_int(self._daemon, cursor_key, envelope_id)
                    except StoreError as err:
                        log.error("relay %s: cannot save the mailbox cursor: %s", relay, err)
                        break  # fetched again later; recognised as a duplicate
                    await self._ack(client, mailbox, envelope_id)
            except RelayError as err:  # renewing the subscription was refused
                quiet.warning(("resubscribe", relay, err.code), "relay %s: %s", relay, err)
            finally:
                subscription.close()
            await trio.sleep(STORE_RETRY_S)

    async def _ack(self, client: RelayClient, mailbox: bytes, envelope_id: int) -> None:
        # Shielded (briefly, so a stopping daemon is not held up): the content is applied and
        # the cursor saved; a cancellation now (a new epoch) would leave the envelope taking
        # the circle's quota until its TTL. A lost ack only means a later duplicate.
        if not client.connected:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(ACK_SHIELD_S):
            try:
                await client.ack(mailbox, envelope_id)
            except RelayError as err:
                quiet.warning(("ack", str(client.address)), "relay %s: ack failed: %s", client.address, err)

    def _receive_envelope(self, relay: str, mailbox: bytes, envelope: bytes) -> bool:
        """Open, check and apply one envelope; False if it must be fetched again later."""
        daemon = self._daemon
        try:
            letter = open_envelope(envelope, mailbox=mailbox, keys_for_epoch=self._keys_for_epoch,
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
            daemon.events.publish("relay.misbehaved", relay=relay, reason=reason, detail=str(err))
            return True
        if arrival is not Arrival.IN_ORDER or self._gaps.is_open(letter.sender):
            holes = self._tracker.missing(letter.sender)
            self._gaps.arrived(relay, letter.sender, letter.seq, holes)
        if arrival is not Arrival.IN_ORDER:
            daemon.events.publish("relay.sequence", relay=relay, sender=letter.sender.hex(),
                                  seq=letter.seq, arrival=arrival.value,
                                  missing=[list(h) for h in holes])
        try:
            self._apply(letter.sender, letter.payload, relay)
            daemon.store.set_state(TRACKER_KEY, msgpack.packb(self._tracker.state()))
        except StoreError as err:
            log.error("relay %s: cannot store what arrived (%s); will fetch it again", relay, err)
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
                            short_key(sender), str(kind)[:64])
        except ProtocolError as err:
            log.warning("relay %s: envelope from %s rejected: %s", relay, short_key(sender), err)
            daemon.count_error(getattr(err, "reason", "rejected"))

    def _vector_received(self, sender: bytes, vector: Any) -> None:
        own = bytes(self._daemon.identity.signing.public)
        have = vector.get(own, 0) if isinstance(vector, dict) else None
        if type(have) is not int or have < 0:
            raise EntryRejected("malformed", "relay.vector without a valid vector")
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
            # batch, and owe the sender our vector so it deposits again from there.
            if len(self._pending) == self._pending.maxlen:
                log.warning("relay: too many out-of-order batches; dropping the oldest (a resend covers it)")
            self._pending.append((sender, batch))
            self._owe_vector(sender)
            return
        self._retry_pending()

    def _retry_pending(self) -> None:
        for _ in range(len(self._pending)):
            sender, batch = self._pending.popleft()
            try:
                self._daemon.logs.ingest(batch, self._daemon.is_author_allowed)
            except StoreError:
                self._pending.appendleft((sender, batch))
                raise
            except EntryRejected as err:
                if err.reason == "gap":
                    self._pending.append((sender, batch))
                else:
                    log.warning("relay: a held batch from %s was rejected: %s", short_key(sender), err)

    def _owe_vector(self, sender: bytes) -> None:
        self._vector_owed.add(sender)
        self._daemon.store.set_state(VECTOR_OWED_KEY, msgpack.packb(sorted(self._vector_owed)))
        self._deposit_wakeup.set()

    # -- depositing -------------------------------------------------------------------------------

    def _deposited_key(self, recipient: bytes) -> str:
        return f"relay.deposited.{recipient.hex()}"

    def _recipients(self) -> list[bytes]:
        """Devices with no direct connection: they get envelopes."""
        daemon = self._daemon
        own = daemon.identity.signing.public
        connected = daemon.peer_manager.connected_sign_keys()
        return [d.sign_key for d in daemon.circle.state.devices()
                if d.sign_key != own and d.sign_key not in connected]

    async def _deposit_loop(self) -> None:
        daemon = self._daemon
        while True:
            self._deposit_wakeup = trio.Event()
            if self._clients and daemon.is_member:
                try:
                    await self._deposit_round()
                except StoreError as err:
                    log.error("relay deposits paused: %s", err)
                    await trio.sleep(STORE_RETRY_S)
                    continue
            await self._deposit_wakeup.wait()

    async def _deposit_round(self) -> None:
        daemon = self._daemon
        own = bytes(daemon.identity.signing.public)
        recipients = self._recipients()
        for sender in sorted(self._vector_owed):
            if not daemon.circle.state.is_member(sender) or sender not in recipients or \
                    await self._deposit_letter(sender, {"t": "relay.vector",
                                                        "vector": daemon.logs.version_vector()}):
                self._vector_owed.discard(sender)
                daemon.store.set_state(VECTOR_OWED_KEY, msgpack.packb(sorted(self._vector_owed)))
        tip = daemon.logs.version_vector().get(own, 0)
        for recipient in recipients:
            records_key = f"relay.records.{recipient.hex()}"
            heads = msgpack.packb(sorted(daemon.circle.heads))
            if daemon.store.get_state(records_key) != heads and await self._deposit_letter(
                    recipient, {"t": "circle.records", "records": daemon.circle.records()}):
                daemon.store.set_state(records_key, heads)
            self._rewound.discard(recipient)
            while (deposited := _state_int(daemon, self._deposited_key(recipient))) < tip:
                batch = daemon.logs.batch_since(own, deposited, DEPOSIT_BATCH_BYTES)
                if batch is None or not await self._deposit_letter(recipient, batch):
                    break
                if recipient in self._rewound:
                    break  # a vector moved the cursor back meanwhile: start again from there
                _set_int(daemon, self._deposited_key(recipient), batch["head"]["seq"])

    async def _deposit_letter(self, recipient: bytes, payload: dict[str, Any]) -> bool:
        """Seal payload for recipient and deposit it at every connected relay; True if any took it."""
        daemon = self._daemon
        try:
            keys = epoch_keys(daemon.circle.state.epoch_number, daemon.circle.epoch_key(daemon.identity.noise))
        except ProtocolError as err:
            quiet.warning(("epoch",), "cannot deposit: %s", err)
            return False
        mailbox = mailbox_id(keys, recipient)
        lock = self._recipient_locks.setdefault(recipient, trio.Lock())
        async with lock:  # one letter at a time per recipient: seqs arrive in order
            seq_key = f"relay.seq.{recipient.hex()}"
            # Reserved before any await: a seq is never used twice (a gap is harmless, a
            # reuse would make the recipient drop a letter as a replay).
            seq = _state_int(daemon, seq_key) + 1
            _set_int(daemon, seq_key, seq)
            envelope = seal_envelope(keys=keys, mailbox=mailbox, signer=daemon.identity.signing, seq=seq,
                                     payload=payload, rng=daemon.rng)
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
                    uncertain += isinstance(err, trio.TooSlowError) or getattr(err, "code", "") == "unavailable"
                    self.failures[address] = str(err)
                    daemon.metrics.relay_deposits.inc(result="failed")
                    quiet.warning(("deposit", address, str(err)), "relay %s refused a deposit: %s", address, err)
                    daemon.events.publish("relay.error", relay=address, error=str(err))

            async with trio.open_nursery() as nursery:
                for address, client in list(self._clients.items()):
                    nursery.start_soon(deposit_at, address, client)
            if not accepted and not uncertain:
                # Certainly stored nowhere: give the seq back, so the recipient sees no hole
                # (this task still holds the recipient's lock, so no later seq exists).
                _set_int(daemon, seq_key, seq - 1)
            return accepted > 0

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

    # -- recovery ------------------------------------------------------------------------------------

    async def recover(self, seed: bytes, relay: str) -> dict[str, Any]:
        """From the recovery words alone: fetch the circle and backup, join, start a new epoch."""
        daemon = self._daemon
        signer, dh, _ = recovery_member(seed)
        try:
            address = RelayAddress.parse(relay)
        except RelayAddressError as err:
            raise ApiError(400, "bad-relay-address", str(err)) from None
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S * 3):
                async with open_relay_session(address, dh, [], rng=daemon.rng, on_push=lambda _: None) as session:
                    circle = Circle.from_records(await session.records())
                    readable = circle.readable_epochs(dh)
                    try:
                        version, manifest = await fetch_manifest(session, circle, readable)
                    except ProtocolError as err:
                        raise ApiError(502, "bad-backup", f"the backup does not verify: {err}") from None
                    return await self._restore(session, circle, readable, signer, version, manifest, relay)
        except (RelayError, ProtocolError, BackupFailed, trio.TooSlowError, OSError) as err:
            raise ApiError(502, "recovery-failed", f"the relay could not provide the backup: {err}") from None

    async def _restore(self, session: Any, circle: Circle, readable: dict[int, bytes], signer: Any,
                       version: int | None, manifest: Manifest, relay: str) -> dict[str, Any]:
        daemon = self._daemon
        try:
            circle.merge(list(manifest.records))
        except RecordRejected as err:
            log.warning("backup records rejected: %s", err)
        try:
            circle.recover(signer, daemon.device, daemon.rng)
            circle.rotate_epoch(daemon.identity.signing, daemon.rng)
        except CircleOperationError as err:
            raise ApiError(409, "cannot-recover", str(err)) from None
        daemon.adopt_circle(circle, "recovery")

        def ingest(batch: dict[str, Any]) -> int:
            try:
                return daemon.logs.ingest(batch, daemon.is_author_allowed)
            except (EntryRejected, StoreError) as err:
                log.warning("a backed-up log batch was rejected: %s", err)
                return 0
        try:
            restored = await restore_logs(session, circle, readable, manifest, ingest)
        except ProtocolError as err:
            raise ApiError(502, "bad-backup", f"a backup segment does not verify: {err}") from None
        await self.add(relay)
        log.warning("RECOVERY: this device restored circle %s from the recovery key (%d entries)",
                    short_key(circle.circle_id), restored)
        return {"circle": circle.circle_id.hex(), "restored_entries": restored,
                "devices": daemon.devices(), "backup_version": version}
