"""The relay path's sending side: what devices out of reach lack, deposited as envelopes.

For every other device of the circle that has no direct connection, this device deposits
its own new log entries (and circle changes, and the version vector it owes a sender that
left a hole) as end-to-end encrypted envelopes into that device's mailbox at every
connected relay. The same envelope goes to each relay with the same per-recipient sequence
number, so a recipient recognises duplicates and notices drops, replays and reorders. A
recipient's version vector moves the deposit cursor back (a hole): nothing is lost while
any relay or the LAN path works. A round that left something undeposited (a relay refused
it: rate-limited, quota; or no session) is tried again after DEPOSIT_RETRY_S, doubling up
to DEPOSIT_RETRY_CAP_S (protocol/relay.md "Device behaviour").

Cost per write (issue 20). A wake (a local commit, a vector, a connection) starts a round
`gather_s` later (the config's deposit_gather, DEPOSIT_GATHER_S by default), so the commits
of a burst (20 writes/s) are sealed as one envelope per recipient, not one per entry: each
envelope costs a seal, a relay request and two durable state writes here, and a stored
envelope at the relay. 0 deposits at once (one envelope per round, as many as commits).

The state written per envelope (its seq reserved, an unconfirmed envelope, the deposit
cursor) is saved in a worker thread: each save is a synchronous=FULL commit that may also
wait for a group commit holding the store's write lock, and on the trio thread it stalled
every API request meanwhile (issue 20: 5% of the trio thread's time at 20 writes/s with one
recipient offline). The seq and the unconfirmed envelope are only touched under the
recipient's lock; a vector that moves the cursor back while it is being saved wins. The
rare writes (records announced, vectors owed) stay where they were, in order with the
callbacks that also write them.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import trio

from ..config import DEPOSIT_GATHER_S
from ..localerrors import LocalErrorBackoff
from ..protocol.circle import EpochKeys
from ..protocol.envelope import mailbox_id, seal_envelope
from ..protocol.errors import ProtocolError
from ..protocol.relay import UNAVAILABLE, RelayError
from ..protocol.sync import parse_vector
from ..quietlog import QuietLogger
from ..store.db import StoreError
from .client import RelayClient
from .linkhost import VECTOR_OWED_KEY, RelayHost, confirmed_key, deposited_key, set_int, state_int

log = logging.getLogger("meshd.relay.links")
quiet = QuietLogger(log)

DEPOSIT_BATCH_BYTES = 256 * 1024
REQUEST_TIMEOUT_S = 10.0
# A round that left something undeposited (refused: rate-limited, quota; or no session) is
# tried again after this pause, doubling up to the cap, even if nothing else wakes the loop.
DEPOSIT_RETRY_S = 1.0
DEPOSIT_RETRY_CAP_S = 30.0
# Circle records are also sealed under this many epochs before the current one (those the
# recipient holds), so a member that missed a change reads it in a mailbox it drains.
ANNOUNCE_EPOCHS = 2


class Deposits:
    def __init__(self, daemon: RelayHost, clients: dict[str, RelayClient],
                 failures: dict[str, str], store_trouble: LocalErrorBackoff, *,
                 gather_s: float = DEPOSIT_GATHER_S) -> None:
        self._daemon = daemon
        self._gather_s = gather_s
        self._clients = clients  # the links' own dict: the relays connected now
        self.failures = failures  # relay -> last refusal, for status
        self._store_trouble = store_trouble
        owed = daemon.store.get_state(VECTOR_OWED_KEY)
        self._vector_owed: set[bytes] = set(msgpack.unpackb(owed)) if owed else set()
        self._wakeup = trio.Event()
        self._recipient_locks: dict[bytes, trio.Lock] = {}
        # recipients whose deposit cursor a vector moved back -> where to (the lowest)
        self._rewound: dict[bytes, int] = {}
        self._own_tip_seen: int | None = None  # our own seq at the last commit heard

    def wake(self) -> None:
        self._wakeup.set()

    def committed(self) -> None:
        """At each commit (a listener: no await). Only our own entries are deposited, and
        only for devices with no direct connection: a commit of another author's entries,
        or one while every device is connected, wakes no round (each was two task steps
        and a round for nothing at every commit, issue 20). What else a round deposits
        (records, vectors owed) and a device going away wake it themselves."""
        own = bytes(self._daemon.identity.signing.public)
        tip = self._daemon.logs.version_vector().get(own, 0)
        if tip == self._own_tip_seen:
            return
        self._own_tip_seen = tip
        if self._recipients():
            self._wakeup.set()

    # -- cursors -------------------------------------------------------------------------------

    def backlog(self) -> int:
        """Own entries not yet deposited for the members that get envelopes (status)."""
        tip = self._daemon.logs.version_vector().get(bytes(self._daemon.identity.signing.public), 0)
        try:
            return sum(max(0, tip - state_int(self._daemon, deposited_key(recipient)))
                       for recipient in self._recipients())
        except StoreError:
            return -1

    def outbox(self) -> dict[str, dict[str, int]]:
        """Per other device (hex key): own entries not yet deposited for it (`behind`) and
        envelopes sealed for it so far (`envelopes`, its last per-recipient seq)."""
        daemon = self._daemon
        own = daemon.identity.signing.public
        tip = daemon.logs.version_vector().get(bytes(own), 0)
        return {d.sign_key.hex(): {
                    "behind": max(0, tip - state_int(daemon, deposited_key(d.sign_key))),
                    "envelopes": state_int(daemon, f"relay.seq.{d.sign_key.hex()}")}
                for d in daemon.circle.state.devices() if d.sign_key != own}

    def synced(self, recipient: bytes, has_own: int) -> None:
        """The LAN sync with recipient gave it our log up to has_own."""
        key = deposited_key(recipient)
        if has_own > state_int(self._daemon, key):
            set_int(self._daemon, key, has_own)
        self.confirm(recipient, has_own)

    def confirm(self, recipient: bytes, has_own: int) -> None:
        """recipient is known to hold our log up to has_own (a LAN sync, its vector): what a
        wiped relay may have lost for it is only what comes after."""
        key = confirmed_key(recipient)
        if has_own > state_int(self._daemon, key):
            set_int(self._daemon, key, has_own)

    def rewind_to_confirmed(self, recipient: bytes) -> None:
        """A relay lost what it held for recipient: deposit again from what it confirmed."""
        key = deposited_key(recipient)
        confirmed = state_int(self._daemon, confirmed_key(recipient))
        if state_int(self._daemon, key) > confirmed:
            set_int(self._daemon, key, confirmed)
            self._rewind(recipient, confirmed)

    def vector_received(self, sender: bytes, vector: Any) -> None:
        own = bytes(self._daemon.identity.signing.public)
        have = parse_vector(vector).get(own, 0)  # EntryRejected("malformed") for a bad one
        self.confirm(sender, have)
        key = deposited_key(sender)
        if have < state_int(self._daemon, key):
            set_int(self._daemon, key, have)
            self._rewind(sender, have)
        self._wakeup.set()

    def _rewind(self, recipient: bytes, cursor: int) -> None:
        self._rewound[recipient] = min(cursor, self._rewound.get(recipient, cursor))

    def owe_vector(self, sender: bytes) -> None:
        self._vector_owed.add(sender)
        self._daemon.store.set_state(VECTOR_OWED_KEY, msgpack.packb(sorted(self._vector_owed)))
        self._wakeup.set()

    def _recipients(self) -> list[bytes]:
        """Devices with no direct connection: they get envelopes."""
        daemon = self._daemon
        own = daemon.identity.signing.public
        connected = daemon.peer_manager.connected_sign_keys()
        return [d.sign_key for d in daemon.circle.state.devices()
                if d.sign_key != own and d.sign_key not in connected]

    # -- depositing -------------------------------------------------------------------------------

    async def run(self) -> None:
        daemon = self._daemon
        retry_s = DEPOSIT_RETRY_S
        while True:
            self._wakeup = trio.Event()
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
                await self._wakeup.wait()
                if self._gather_s:  # the commits of a burst go in one envelope
                    await trio.sleep(self._gather_s)
            else:
                # Something was left (e.g. the relay rate-limited the last deposit): no
                # later commit may come to wake the loop, so try again after a pause.
                with trio.move_on_after(retry_s):
                    await self._wakeup.wait()
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
            self._rewound.pop(recipient, None)
            while (deposited := state_int(daemon, deposited_key(recipient))) < tip:
                batch = daemon.logs.batch_since(own, deposited, DEPOSIT_BATCH_BYTES)
                if batch is None:
                    break
                if not await self._deposit_letter(recipient, batch):
                    done = False
                    break
                if recipient in self._rewound:
                    break  # a vector moved the cursor back meanwhile: start again from there
                await self._save_int(deposited_key(recipient), batch["head"]["seq"])
                if (back := self._rewound.get(recipient)) is not None:
                    # A vector moved the cursor back while this save ran: the lower wins.
                    await self._save_int(deposited_key(recipient), back)
                    break
        return done

    async def _save(self, key: str, value: bytes) -> None:
        """A durable state write off the trio thread (not cancellable: it completes)."""
        await trio.to_thread.run_sync(self._daemon.store.set_state, key, value)

    async def _save_int(self, key: str, value: int) -> None:
        await self._save(key, str(value).encode())

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
                await self._save(unsent_key, b"")
            mailbox = mailbox_id(keys, recipient)
            # Reserved (durably) before the envelope is sealed, and only under the
            # recipient's lock: a seq is never used twice (a reuse would make the recipient
            # drop a letter as a replay).
            seq = state_int(daemon, seq_key) + 1
            await self._save_int(seq_key, seq)
            envelope = seal_envelope(keys=keys, mailbox=mailbox, signer=daemon.identity.signing, seq=seq,
                                     payload=payload, rng=daemon.rng)
            outcome = await self._deposit_everywhere(mailbox, envelope)
            if outcome == "uncertain":
                await self._save(unsent_key, msgpack.packb([seq, mailbox, envelope]))
            elif outcome == "refused":
                # Certainly stored nowhere: give the seq back, so the recipient sees no hole
                # (this task still holds the recipient's lock, so no later seq exists).
                await self._save_int(seq_key, seq - 1)
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
