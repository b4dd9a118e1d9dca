"""The relay path: envelopes for devices the LAN cannot reach, the encrypted backup, recovery.

RelayLinks keeps one client per configured relay (relay/client.py) and wires the two sides
of the path to them: relay/deposits.py deposits this device's new entries for the devices
out of reach, relay/mailboxes.py drains this device's own mailboxes; meshd/backup.py keeps
the encrypted backup at each relay. It also answers for the relay list (add, remove, status)
and for a relay found wiped or replaced ("Incarnation"). See protocol/relay.md ("Device
behaviour").

Ordering rule for the receive path: an envelope is acknowledged, and the replay tracker and
mailbox cursor saved, only after its content was applied; a failure to apply (a full disk)
leaves it at the relay to be fetched again.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import trio

from ..backup import Backups
from ..errors import InvalidArgument, NotFound
from ..localerrors import LocalErrorBackoff
from ..protocol.records import RecordRejected
from ..protocol.relay import RelayError
from ..store.db import StoreError
from .address import RelayAddress, RelayAddressError
from .backuploop import BackupLoop
from .client import RelayClient
from .deposits import REQUEST_TIMEOUT_S, Deposits
from .health import RelayHealth
from .linkhost import RelayHost, cursor_key, incarnation_key, set_int
from .mailboxes import Mailboxes

log = logging.getLogger(__name__)

RELAYS_KEY = "relays"
# Enrolment tokens the owner gave (relay key -> token), this device's only: never shared
# with the circle, shown or logged. A relay in token mode needs one for a new circle.
RELAY_TOKENS_KEY = "relay_tokens"


class RelayLinks:
    def __init__(self, daemon: RelayHost) -> None:
        self._daemon = daemon
        stored = daemon.store.get_state(RELAYS_KEY)
        self._addresses: list[str] = list(daemon.config.relays)
        for address in msgpack.unpackb(stored) if stored else []:
            if address not in self._addresses:
                self._addresses.append(address)
        stored_tokens = daemon.store.get_state(RELAY_TOKENS_KEY)
        self._tokens: dict[bytes, bytes] = dict(msgpack.unpackb(stored_tokens)) if stored_tokens else {}
        self._clients: dict[str, RelayClient] = {}
        self._link_scopes: dict[str, trio.CancelScope] = {}  # address -> its link, to remove it
        self._drain_scopes: dict[str, trio.CancelScope] = {}
        self._circle_id = daemon.circle.circle_id  # the circle the sessions registered
        self._nursery: trio.Nursery | None = None
        self._held_may_fill = trio.Event()  # set by a commit while batches are held
        store_trouble = LocalErrorBackoff()  # this device's storage failing: pause, log once
        self.failures: dict[str, str] = {}  # relay -> last refusal, for status
        self.health = RelayHealth(daemon.events, daemon.metrics.relay_misbehaviour)
        self.backups = Backups(daemon, self.health.misbehaved)
        self.backup_loop = BackupLoop(daemon, self.backups, self._clients, self._spawn)
        self.deposits = Deposits(daemon, self._clients, self.failures, store_trouble,
                                 gather_s=daemon.config.deposit_gather)
        self.mailboxes = Mailboxes(daemon, self.deposits, self.health, store_trouble,
                                   self._refresh_circle)
        daemon.metrics.collectors.append(self.backups.update_age)

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
        return self.deposits.backlog()

    async def add(self, address: str, token: bytes | None = None) -> dict[str, Any]:
        """Use a relay (with its enrolment token, when the owner gave one; a relay already
        in use takes it at its next attempt)."""
        try:
            key = RelayAddress.parse(address).key
        except RelayAddressError as err:
            raise InvalidArgument("bad-relay-address", str(err)) from None
        if token is not None and self._tokens.get(key) != token:
            self._tokens[key] = token
            self._daemon.store.set_state(RELAY_TOKENS_KEY, msgpack.packb(self._tokens))
            for client in self._clients.values():
                if client.address.key == key:
                    client.token = token
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
        if not remaining and self._tokens.pop(RelayAddress.parse(address).key, None) is not None:
            self._daemon.store.set_state(RELAY_TOKENS_KEY, msgpack.packb(self._tokens))
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
        return self.deposits.outbox()

    def connected_clients(self) -> list[RelayClient]:
        return [client for client in self._clients.values() if client.connected]

    def circle_changed(self) -> None:
        circle_id = self._daemon.circle.circle_id
        mailboxes = tuple(self.mailboxes.mine())
        if mailboxes != self.mailboxes.drained:
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
        self.deposits.wake()
        self.backup_loop.changed(prompt=True)


    def peer_synced(self, recipient: bytes, has_own: int) -> None:
        """The LAN sync with recipient ended having given it our log up to has_own: the relay
        path need not deposit that again."""
        try:
            self.deposits.synced(recipient, has_own)
        except StoreError as err:  # only an optimisation: deposits may repeat what it had
            log.warning("could not save the relay cursor: %s", err)

    def _new_incarnation(self, address: str, previous: bytes | None, new: bytes) -> None:
        """The relay registered with another storage id than the one last seen: it was wiped
        or replaced. Its envelope ids start again and it holds none of our deposits or
        backups: reset what this device keeps for it and deposit there again (protocol/
        relay.md "Incarnation"). Not a rollback: the sequence tracker is kept, so nothing
        old it might serve is taken twice."""
        daemon = self._daemon
        try:
            daemon.store.set_state(incarnation_key(address), new)
            if previous is None:
                return  # the first contact: nothing kept for it yet
            for mailbox in self.mailboxes.mine():
                set_int(daemon, cursor_key(address, mailbox), 0)
            self.backups.forget(address)  # its manifest and segments are gone with it
            own = bytes(daemon.identity.signing.public)
            for device in daemon.circle.state.devices():
                recipient = device.sign_key
                if recipient == own:
                    continue
                # What the relay held for it is lost; other relays hold the same envelopes
                # with the same seqs, so depositing again (new seqs, at every relay) only
                # makes duplicates the recipient ignores.
                self.deposits.rewind_to_confirmed(recipient)
                daemon.store.set_state(f"relay.records.{recipient.hex()}", b"")
        except StoreError as err:
            log.error("relay %s: could not reset the state kept for it: %s", address, err)
        log.warning("relay %s is a new incarnation (wiped or replaced): reading it from the "
                    "start and depositing there again", address)
        daemon.events.publish("relay.incarnation", relay=address, previous=previous.hex(),
                              incarnation=new.hex())
        self.deposits.wake()
        self.backup_loop.changed(prompt=True)

    def peers_changed(self) -> None:
        self.deposits.wake()

    def local_commit(self) -> None:
        self.deposits.committed()
        self.backup_loop.changed()  # entries: the backup's batching window gathers them

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
        self.deposits.wake()
        self.backup_loop.changed(prompt=True)

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for address in self._addresses:
                if self._same_relay(address)[0] == address:
                    nursery.start_soon(self._link, address)
            nursery.start_soon(self.deposits.run)
            nursery.start_soon(self.backup_loop.run)
            nursery.start_soon(self._release_held_on_commits)
            undo = self._daemon.logs.changed.listen(self._commit_heard)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                undo()

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

    def _commit_heard(self) -> None:
        """A listener of each commit: the nudge is bookkeeping; held batches, if any, may have
        had their hole filled by another path (LAN sync)."""
        self.local_commit()
        if self.mailboxes.holding():
            self._held_may_fill.set()

    async def _release_held_on_commits(self) -> None:
        """Its own task: a release waits for a mailbox's apply run (its commits are in a
        worker thread), and must not hold up local_commit meanwhile."""
        while True:
            await self._held_may_fill.wait()
            self._held_may_fill = trio.Event()
            await self.mailboxes.release_all_held()

    async def _link(self, address: str) -> None:
        if address not in self._addresses:
            return  # removed before this task started
        daemon = self._daemon
        client = RelayClient(address, daemon.identity.noise, lambda: daemon.circle.records(),
                             rng=daemon.rng, on_connected=lambda: self._connected(client),
                             on_records=lambda records: self._records_pushed(address, records),
                             incarnation=daemon.store.get_state(incarnation_key(address)),
                             on_incarnation=lambda previous, new: self._new_incarnation(
                                 address, previous, new),
                             on_disconnected=lambda: daemon.presence.relay_connection_changed(
                                 str(client.address), up=False),
                             alternates=self._same_relay(address)[1:],
                             token=self._tokens.get(RelayAddress.parse(address).key))
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
                        await self.mailboxes.drain(client)
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

    def _refresh_circle(self, relay: str) -> None:
        """Re-register at that relay and read its records (a letter from an unknown device)."""
        for client in self._clients.values():
            if str(client.address) == relay:
                self._spawn(self._reregister, client)
