"""The relay path: envelopes for devices the LAN cannot reach, the encrypted backup, recovery.

For every other device of the circle that has no direct connection, this device deposits its
own new log entries (and circle changes) as end-to-end encrypted envelopes into that device's
mailbox at every configured relay, and it drains its own mailbox from whichever relay
answers. The same envelope goes to each relay with the same per-recipient sequence number,
so a recipient recognises duplicates and notices drops, replays and reorders (the shared
SequenceTracker). A recipient that finds a hole in an author's log answers with its version
vector, which moves the sender's deposit cursor back: nothing is lost while any relay or the
LAN path works. See protocol/relay.md ("device behaviour").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from .api import ApiError
from .logsync import EntryRejected
from .protocol.circle import Circle, EpochKeys, RecordRejected, epoch_keys
from .protocol.crypto import short_key
from .protocol.envelope import (
    Arrival,
    EnvelopeRejected,
    EnvelopeReplayed,
    RollbackDetected,
    RollbackGuard,
    SequenceTracker,
    mailbox_id,
    open_backup,
    open_envelope,
    seal_backup,
    seal_envelope,
)
from .protocol.errors import ProtocolError
from .protocol.recovery import recovery_member
from .protocol.relay import RelayError
from .quietlog import QuietLogger
from .relay.client import RelayAddress, RelayAddressError, RelayClient, open_relay_session
from .store import StoreError

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

DEPOSIT_BATCH_BYTES = 256 * 1024
REQUEST_TIMEOUT_S = 10.0
BACKUP_DEBOUNCE_S = 2.0
RELAYS_KEY = "relays"
TRACKER_KEY = "relay.tracker"
BACKUP_VERSION_KEY = "relay.backup-version"


def _state_int(daemon: Daemon, key: str) -> int:
    raw = daemon.store.get_state(key)
    return int(raw.decode()) if raw else 0


class RelayLinks:
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        stored = daemon.store.get_state(RELAYS_KEY)
        self._addresses: list[str] = list(daemon.config.relays)
        for address in msgpack.unpackb(stored) if stored else []:
            if address not in self._addresses:
                self._addresses.append(address)
        self._clients: dict[str, RelayClient] = {}
        raw_tracker = daemon.store.get_state(TRACKER_KEY)
        self._tracker = SequenceTracker(
            {bytes(k): (t, list(a)) for k, (t, a) in msgpack.unpackb(raw_tracker, strict_map_key=False).items()}
            if raw_tracker else None)
        self._rollback = RollbackGuard(_state_int(daemon, BACKUP_VERSION_KEY))
        self._deposit_wakeup = trio.Event()
        self._drain_scopes: dict[str, trio.CancelScope] = {}
        self._backup_wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._pending: list[tuple[bytes, dict[str, Any]]] = []  # batches waiting for a hole to fill
        self.failures: dict[str, str] = {}  # relay -> last refusal, for status

    # -- status and control ------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for address in self._addresses:
            client = self._clients.get(address)
            entry = client.describe() if client else {"address": address, "connected": False}
            if address in self.failures:
                entry["refused"] = self.failures[address]
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
            if self._nursery is not None:
                self._nursery.start_soon(self._link, address)
        return {"address": address, "relays": len(self._addresses)}

    def circle_changed(self) -> None:
        for scope in self._drain_scopes.values():
            scope.cancel()
        self._deposit_wakeup.set()
        self._backup_wakeup.set()
        for _address, client in self._clients.items():
            if client.connected:
                assert self._nursery is not None
                self._nursery.start_soon(self._reregister, client)

    def _records_pushed(self, relay: str, records: list[bytes]) -> None:
        try:
            self._daemon.merge_circle_records(records, source=f"relay {relay}")
        except RecordRejected as err:
            log.warning("relay %s pushed circle records that do not verify: %s", relay, err)
            self._daemon.events.publish("relay.misbehaved", relay=relay, reason="bad-records", detail=str(err))

    def _spawn(self, task: Any, *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(task, *args)

    def peers_changed(self) -> None:
        self._deposit_wakeup.set()

    def local_commit(self) -> None:
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
                             rng=daemon.rng, on_connected=lambda: self._spawn(self._reregister, client),
                             on_records=lambda records: self._records_pushed(address, records))
        self._clients[address] = client
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            while True:
                # Drain this epoch's mailboxes until the circle changes (a new epoch means
                # new mailbox ids), then start over with the new set.
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
        """This device's mailbox in each of the two newest epochs it can read."""
        daemon = self._daemon
        readable = daemon.circle.readable_epochs(daemon.identity.noise)
        out = {}
        for number in sorted(readable, reverse=True)[:2]:
            keys = epoch_keys(number, readable[number])
            out[mailbox_id(keys, daemon.identity.signing.public)] = keys
        return out

    def _keys_for_epoch(self, number: int) -> EpochKeys | None:
        readable = self._daemon.circle.readable_epochs(self._daemon.identity.noise)
        return epoch_keys(number, readable[number]) if number in readable else None

    async def _drain_mailboxes(self, client: RelayClient) -> None:
        if not self._daemon.is_member:
            return
        async with trio.open_nursery() as nursery:
            for mailbox in self._my_mailboxes():
                nursery.start_soon(self._drain_one, client, mailbox)

    async def _drain_one(self, client: RelayClient, mailbox: bytes) -> None:
        cursor_key = f"relay.cursor.{client.address}.{mailbox.hex()}"
        subscription = await client.subscribe(mailbox, _state_int(self._daemon, cursor_key))
        try:
            async for envelope_id, envelope in subscription:
                self._receive_envelope(str(client.address), mailbox, envelope)
                self._daemon.store.set_state(cursor_key, str(envelope_id).encode())
                try:
                    with trio.fail_after(REQUEST_TIMEOUT_S):
                        await client.ack(mailbox, envelope_id)
                except (RelayError, trio.TooSlowError) as err:
                    quiet.warning(("ack", str(client.address)), "relay %s: ack failed: %s", client.address, err)
        finally:
            subscription.close()

    def _receive_envelope(self, relay: str, mailbox: bytes, envelope: bytes) -> None:
        daemon = self._daemon
        try:
            letter = open_envelope(envelope, mailbox=mailbox, keys_for_epoch=self._keys_for_epoch,
                                   is_sender_allowed=daemon.is_author_allowed)
            arrival = self._tracker.accept(letter.sender, letter.seq)
        except EnvelopeReplayed as err:
            log.debug("relay %s: duplicate envelope ignored: %s", relay, err)
            return
        except EnvelopeRejected as err:
            log.warning("relay %s delivered an envelope that fails verification (%s): %s",
                        relay, err.reason, err)
            daemon.count_error(f"envelope-{err.reason}")
            daemon.events.publish("relay.misbehaved", relay=relay, reason=err.reason, detail=str(err))
            return
        self._daemon.store.set_state(TRACKER_KEY, msgpack.packb(self._tracker.state()))
        if arrival is not Arrival.IN_ORDER:
            holes = self._tracker.missing(letter.sender)
            log.warning("relay %s: envelope %d from %s arrived %s (missing: %s)", relay, letter.seq,
                        short_key(letter.sender), arrival.value, holes or "none")
            daemon.events.publish("relay.sequence", relay=relay, sender=letter.sender.hex(),
                                  seq=letter.seq, arrival=arrival.value,
                                  missing=[list(h) for h in holes])
        self._apply(letter.sender, letter.payload, relay)

    def _apply(self, sender: bytes, payload: dict[str, Any], relay: str) -> None:
        daemon = self._daemon
        kind = payload.get("t")
        try:
            if kind == "circle.records":
                daemon.merge_circle_records(list(payload.get("records", [])), source=f"relay {relay}")
            elif kind == "log.entries":
                self._ingest(sender, payload)
            elif kind == "relay.vector":
                vector = payload.get("vector", {})
                own = bytes(daemon.identity.signing.public)
                have = vector.get(own, 0) if isinstance(vector, dict) else 0
                if isinstance(have, int):
                    self._set_deposited(sender, min(have, _state_int(daemon, self._deposited_key(sender))))
                    self._deposit_wakeup.set()
            else:
                log.warning("relay %s: envelope from %s with unknown payload %r", relay,
                            short_key(sender), kind)
        except (RecordRejected, EntryRejected) as err:
            log.warning("relay %s: envelope from %s rejected: %s", relay, short_key(sender), err)
            daemon.count_error(getattr(err, "reason", "rejected"))

    def _ingest(self, sender: bytes, batch: dict[str, Any]) -> None:
        daemon = self._daemon
        try:
            added = daemon.logs.ingest(batch, daemon.is_author_allowed)
        except EntryRejected as err:
            if err.reason != "gap":
                raise
            # An envelope is missing (dropped by a relay, or still on another): keep this batch,
            # and tell the sender where we are so it deposits again from there.
            self._pending.append((sender, batch))
            self._ask_for_resend(sender)
            return
        if added:
            daemon.metrics.entries.inc(added)
            self._retry_pending()

    def _retry_pending(self) -> None:
        pending, self._pending = self._pending, []
        for sender, batch in pending:
            try:
                self._daemon.logs.ingest(batch, self._daemon.is_author_allowed)
            except EntryRejected as err:
                if err.reason == "gap":
                    self._pending.append((sender, batch))

    def _ask_for_resend(self, sender: bytes) -> None:
        vector = self._daemon.logs.version_vector()
        self._queue_letter(sender, {"t": "relay.vector", "vector": vector})

    # -- depositing -------------------------------------------------------------------------------

    def _deposited_key(self, recipient: bytes) -> str:
        return f"relay.deposited.{recipient.hex()}"

    def _set_deposited(self, recipient: bytes, seq: int) -> None:
        self._daemon.store.set_state(self._deposited_key(recipient), str(seq).encode())

    def _recipients(self) -> list[bytes]:
        """Devices with no direct connection: they get envelopes."""
        daemon = self._daemon
        own = daemon.identity.signing.public
        connected = daemon.peer_manager.connected_sign_keys()
        return [d.sign_key for d in daemon.circle.state.devices()
                if d.sign_key != own and d.sign_key not in connected]

    def _queue_letter(self, recipient: bytes, payload: dict[str, Any]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._deposit_letter, recipient, payload)

    async def _deposit_loop(self) -> None:
        daemon = self._daemon
        own = bytes(daemon.identity.signing.public)
        while True:
            self._deposit_wakeup = trio.Event()
            if self._clients and daemon.is_member:
                tip = daemon.logs.version_vector().get(own, 0)
                for recipient in self._recipients():
                    records_key = f"relay.records.{recipient.hex()}"
                    heads = msgpack.packb(sorted(daemon.circle.heads))
                    if daemon.store.get_state(records_key) != heads:
                        if await self._deposit_letter(recipient, {"t": "circle.records",
                                                                  "records": daemon.circle.records()}):
                            daemon.store.set_state(records_key, heads)
                    deposited = _state_int(daemon, self._deposited_key(recipient))
                    while deposited < tip:
                        batch = daemon.logs.batch_since(own, deposited, DEPOSIT_BATCH_BYTES)
                        if batch is None:
                            break
                        if not await self._deposit_letter(recipient, batch):
                            break
                        deposited = batch["head"]["seq"]
                        self._set_deposited(recipient, deposited)
            await self._deposit_wakeup.wait()

    async def _deposit_letter(self, recipient: bytes, payload: dict[str, Any]) -> bool:
        """Seal payload for recipient and deposit it at every connected relay; True if any took it."""
        daemon = self._daemon
        state = daemon.circle.state
        try:
            keys = epoch_keys(state.epoch_number, daemon.circle.epoch_key(daemon.identity.noise))
        except ProtocolError as err:
            quiet.warning(("epoch",), "cannot deposit: %s", err)
            return False
        mailbox = mailbox_id(keys, recipient)
        seq_key = f"relay.seq.{recipient.hex()}"
        seq = _state_int(daemon, seq_key) + 1
        envelope = seal_envelope(keys=keys, mailbox=mailbox, signer=daemon.identity.signing, seq=seq,
                                 payload=payload, rng=daemon.rng)
        accepted = 0

        async def deposit_at(address: str, client: RelayClient) -> None:
            nonlocal accepted
            if not client.connected:
                return
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    await client.deposit(mailbox, envelope)
                accepted += 1
                self.failures.pop(address, None)
                daemon.metrics.relay_deposits.inc(result="ok")
            except (RelayError, trio.TooSlowError) as err:
                self.failures[address] = str(err)
                daemon.metrics.relay_deposits.inc(result="failed")
                quiet.warning(("deposit", address, str(err)), "relay %s refused a deposit: %s", address, err)
                daemon.events.publish("relay.error", relay=address, error=str(err))

        async with trio.open_nursery() as nursery:
            for address, client in list(self._clients.items()):
                nursery.start_soon(deposit_at, address, client)
        if accepted:
            daemon.store.set_state(seq_key, str(seq).encode())
        return accepted > 0

    # -- backup --------------------------------------------------------------------------------------

    async def _backup_loop(self) -> None:
        daemon = self._daemon
        while True:
            await self._backup_wakeup.wait()
            await trio.sleep(BACKUP_DEBOUNCE_S)  # debounce: one backup per burst of changes
            self._backup_wakeup = trio.Event()
            if not daemon.is_member:
                continue
            for address, client in list(self._clients.items()):
                if client.connected:
                    await self._put_backup(address, client)

    def snapshot(self) -> dict[str, Any]:
        daemon = self._daemon
        batches = []
        for author, tip in daemon.logs.version_vector().items():
            after = 0
            while after < tip:
                batch = daemon.logs.batch_since(author, after, 4 * 1024 * 1024)
                if batch is None:
                    break
                batches.append(batch)
                after = batch["head"]["seq"]
        return {"records": daemon.circle.records(), "logs": batches}

    async def _put_backup(self, address: str, client: RelayClient) -> None:
        daemon = self._daemon
        try:
            keys = epoch_keys(daemon.circle.state.epoch_number, daemon.circle.epoch_key(daemon.identity.noise))
            with trio.fail_after(REQUEST_TIMEOUT_S):
                stored = await client.backup_get()
            current = stored.version if stored else 0
            if stored is not None:
                self._rollback.check(stored.version)
            blob = seal_backup(keys=keys, circle_id=daemon.circle.circle_id, signer=daemon.identity.signing,
                               version=current + 1, snapshot=self.snapshot(), rng=daemon.rng)
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await client.backup_put(current, current + 1, blob)
            self._rollback.check(current + 1)
            daemon.store.set_state(BACKUP_VERSION_KEY, str(current + 1).encode())
            log.info("backup version %d stored at relay %s", current + 1, address)
            daemon.events.publish("relay.backup", relay=address, version=current + 1,
                                  entries=sum(daemon.logs.version_vector().values()))
        except RollbackDetected as err:
            log.error("relay %s serves an older backup than one already seen: %s", address, err)
            daemon.events.publish("relay.misbehaved", relay=address, reason="rollback", detail=str(err))
        except (RelayError, ProtocolError, trio.TooSlowError) as err:
            quiet.warning(("backup", address, str(err)), "relay %s: backup failed: %s", address, err)
            self._backup_wakeup.set()

    # -- recovery ------------------------------------------------------------------------------------

    async def recover(self, seed: bytes, relay: str) -> dict[str, Any]:
        """From the recovery words alone: fetch the circle and backup, join, start a new epoch."""
        daemon = self._daemon
        signer, dh, recovery = recovery_member(seed)
        try:
            address = RelayAddress.parse(relay)
        except RelayAddressError as err:
            raise ApiError(400, "bad-relay-address", str(err)) from None
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S * 3):
                async with open_relay_session(address, dh, [], rng=daemon.rng, on_push=lambda _: None) as session:
                    records = await session.records()
                    circle = Circle.from_records(records)
                    readable = circle.readable_epochs(dh)
                    stored = await session.backup_get()
        except (RelayError, ProtocolError, trio.TooSlowError, OSError) as err:
            raise ApiError(502, "recovery-failed", f"the relay could not provide the circle: {err}") from None
        snapshot: dict[str, Any] = {"records": [], "logs": []}
        if stored is not None:
            try:
                backup = open_backup(stored.blob, circle_id=circle.circle_id, version=stored.version,
                                     keys_for_epoch=lambda n: epoch_keys(n, readable[n]) if n in readable else None,
                                     is_signer_allowed=lambda key: circle.state.is_member(key)
                                     or key in circle.state.removed)
                snapshot = backup.snapshot
            except ProtocolError as err:
                raise ApiError(502, "bad-backup", f"the backup does not verify: {err}") from None
        try:
            circle.merge(list(snapshot.get("records", [])))
        except RecordRejected as err:
            log.warning("backup records rejected: %s", err)
        circle.recover(signer, daemon.device, daemon.rng)
        circle.rotate_epoch(daemon.identity.signing, daemon.rng)
        daemon.adopt_circle(circle, "recovery")
        restored = 0
        for batch in snapshot.get("logs", []):
            try:
                restored += daemon.logs.ingest(batch, daemon.is_author_allowed)
            except (EntryRejected, StoreError) as err:
                log.warning("a backed-up log batch was rejected: %s", err)
        await self.add(relay)
        log.warning("RECOVERY: this device restored circle %s from the recovery key (%d entries)",
                    short_key(circle.circle_id), restored)
        return {"circle": circle.circle_id.hex(), "restored_entries": restored,
                "devices": daemon.devices(), "backup_version": stored.version if stored else None}

