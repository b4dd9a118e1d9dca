"""The relay server and client over real loopback TCP, with real circles and envelopes."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from meshd.net.transport import PeerClosed, connect_secure, open_secure_connection
from meshd.protocol.channel import UnauthorizedPeer
from meshd.protocol.circle import Circle, EpochKeys, epoch_keys
from meshd.protocol.constants import HANDSHAKE_TIMEOUT_S
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair
from meshd.protocol.envelope import (
    Arrival,
    EnvelopeRejected,
    EnvelopeReplayed,
    SequenceTracker,
    mailbox_id,
    open_backup,
    open_envelope,
    seal_backup,
    seal_envelope,
)
from meshd.protocol.records import DeviceInfo
from meshd.protocol.recovery import recovery_member
from meshd.protocol.relay import (
    BAD_RECORDS,
    CONFLICT,
    MALFORMED,
    NOT_A_MEMBER,
    NOT_REGISTERED,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    TOO_LARGE,
    UNKNOWN_TYPE,
    Limits,
    RelayError,
)
from meshd.relay import server as relay_server
from meshd.relay.address import RelayAddress
from meshd.relay.client import RelayClient
from meshd.relay.command import relay_address
from meshd.relay.connection import SEND_TIMEOUT_S
from meshd.relay.server import REGISTER_TIMEOUT_S, RelayServer
from meshd.relay.session import open_relay_session
from meshd.relay.storage import (
    DATABASE_FILE,
    PURGE_BOUND_S,
    NewEnvelope,
    SQLiteRelayStorage,
)

from ..polling import poll_until
from ..protocol.harness import seeded_rng

# ---- circles and devices -------------------------------------------------------------


@dataclass
class Member:
    name: str
    signer: SigningKeyPair
    dh: DHKeyPair

    @property
    def info(self) -> DeviceInfo:
        return DeviceInfo(bytes(self.signer.public), bytes(self.dh.public), self.name).claimed(
            self.signer)

    @property
    def sign_key(self) -> bytes:
        return bytes(self.signer.public)


def make_member(name: str, rng: Any) -> Member:
    return Member(name, SigningKeyPair(rng(32)), DHKeyPair.generate(rng))


def make_circle(*names: str, seed: int = 1) -> tuple[Circle, dict[str, Member], Any]:
    rng = seeded_rng(seed)
    members = {name: make_member(name, rng) for name in names}
    founder = members[names[0]]
    circle = Circle.create(founder.signer, founder.info, rng)
    for name in names[1:]:
        circle.add_device(founder.signer, members[name].info, rng)
    return circle, members, rng


def keys_of(circle: Circle, member: Member) -> dict[int, EpochKeys]:
    return {n: epoch_keys(n, k) for n, k in circle.readable_epochs(member.dh).items()}


def current_keys(circle: Circle, member: Member) -> EpochKeys:
    return epoch_keys(circle.state.epoch_number, circle.epoch_key(member.dh))


# ---- a relay on loopback -------------------------------------------------------------


@dataclass
class WallClock:
    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RunningRelay:
    server: RelayServer
    address: str
    state_dir: Path
    clock: WallClock
    static: DHKeyPair
    port: int
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)


# ---- the two storage backends --------------------------------------------------------
#
# Every test in this module that runs a relay runs on SQLite and on PostgreSQL (a real
# server, tests/postgres.py). A state directory stands for one relay's storage: on
# PostgreSQL, one database per directory, so a restart on the same directory finds it.

BACKENDS = ("sqlite", "postgresql")
# Tests of connection handling under a mock clock: storage-independent, SQLite only.
SQLITE_ONLY = {"bare_server"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "relay_backend" in metafunc.fixturenames and not SQLITE_ONLY & set(metafunc.fixturenames):
        metafunc.parametrize("relay_backend", BACKENDS, indirect=True)


@dataclass
class Backend:
    name: str = "sqlite"
    databases: dict[Path, str] = field(default_factory=dict)  # state dir -> DSN
    new_database: Any = None

    def open(self, state_dir: Path) -> Any:
        state_dir.mkdir(exist_ok=True)
        if self.name == "sqlite":
            return SQLiteRelayStorage(state_dir / DATABASE_FILE)
        from meshd.relay.postgres import PostgresRelayStorage

        dsn = self.databases.get(state_dir)
        if dsn is None:
            dsn = self.databases[state_dir] = self.new_database()
        return PostgresRelayStorage(dsn)


BACKEND = Backend()  # what open_storage uses: SQLite unless the fixture below says otherwise


@pytest.fixture(autouse=True)
def relay_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    global BACKEND
    name = getattr(request, "param", "sqlite")
    backend = Backend(name)
    if name == "postgresql":
        server = request.getfixturevalue("postgres")
        backend.new_database = server.new_database
    BACKEND = backend
    try:
        yield name
    finally:
        BACKEND = Backend()


def open_storage(state_dir: Path) -> Any:
    return BACKEND.open(state_dir)


def stored_bytes(relay: RunningRelay) -> bytes:
    """Everything the relay's storage holds, as it lies on disk (SQLite) or in its tables."""
    storage = relay.server.storage
    if isinstance(storage, SQLiteRelayStorage):
        return b"".join(path.read_bytes() for path in sorted(relay.state_dir.iterdir()))
    with storage._pool.connection() as db:  # noqa: SLF001 - the test reads every column
        rows = db.execute("SELECT records FROM circles UNION ALL SELECT envelope FROM envelopes "
                          "UNION ALL SELECT blob FROM backups UNION ALL SELECT blob FROM segments"
                          ).fetchall()
    return b"".join(bytes(row[0]) for row in rows)


@asynccontextmanager
async def running_relay(
    state_dir: Path, *, limits: Limits | None = None, storage: SQLiteRelayStorage | None = None,
    port: int = 0, static: DHKeyPair | None = None, clock: WallClock | None = None,
) -> AsyncIterator[RunningRelay]:
    static = static or DHKeyPair.generate(seeded_rng(99))
    storage = storage or open_storage(state_dir)
    clock = clock or WallClock()
    server = RelayServer(storage, static, limits=limits or Limits(), wall_clock=clock)
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    relay = RunningRelay(server, relay_address("127.0.0.1", port, static.public), state_dir,
                         clock, static, port)
    try:

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            with relay.cancel:  # cancelling it stops this relay and nothing else
                await server.serve(listeners, task_status=task_status)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            yield relay
            nursery.cancel_scope.cancel()
    finally:
        storage.close()


def session(relay: RunningRelay, member: Member, circle: Circle, **options: Any):
    return open_relay_session(relay.address, member.dh, circle.records(), **options)


class Inbox:
    """A device's view of its mailbox: open every envelope, track order, note problems."""

    def __init__(self, circle: Circle, me: Member) -> None:
        self.circle = circle
        self.me = me
        self.tracker = SequenceTracker()
        self.letters: list[dict[str, Any]] = []
        self.problems: list[str] = []

    def mailbox(self, keys: EpochKeys | None = None) -> bytes:
        return mailbox_id(keys or current_keys(self.circle, self.me), self.me.sign_key)

    def read(self, items: Any, keys: EpochKeys | None = None) -> None:
        for _, envelope in items:
            try:
                letter = open_envelope(envelope, mailbox=self.mailbox(keys),
                                       keys_for_epoch=keys_of(self.circle, self.me).get,
                                       is_sender_allowed=self.circle.state.is_member)
                arrival = self.tracker.accept(letter.sender, letter.seq)
            except (EnvelopeRejected, EnvelopeReplayed) as err:
                self.problems.append(err.reason)
                continue
            if arrival is not Arrival.IN_ORDER:
                self.problems.append(arrival.value)
            self.letters.append(letter.payload)


def seal_for(circle: Circle, sender: Member, recipient: Member, seq: int, text: str) -> bytes:
    keys = current_keys(circle, sender)
    return seal_envelope(keys=keys, mailbox=mailbox_id(keys, recipient.sign_key),
                         signer=sender.signer, seq=seq,
                         payload={"t": "log.entries", "text": text}, rng=seeded_rng(seq))


# ---- mailbox basics ------------------------------------------------------------------


async def test_deposit_push_fetch_and_ack(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice", "bob")
    bob_inbox = Inbox(circle, m["bob"])
    pushed: list[Any] = []
    arrived = trio.Event()

    def on_push(envelopes: Any) -> None:
        pushed.extend(envelopes.items)
        if len(pushed) == 3:
            arrived.set()

    async with running_relay(tmp_path / "relay") as relay:
        async with session(relay, m["bob"], circle, on_push=on_push) as bob, \
                session(relay, m["alice"], circle) as alice:
            assert bob.registration is not None
            assert bob.registration.circle_id == circle.circle_id
            await bob.subscribe(bob_inbox.mailbox())
            ids = [await alice.deposit(bob_inbox.mailbox(), seal_for(circle, m["alice"], m["bob"], n, f"hi {n}"))
                   for n in (1, 2, 3)]
            assert ids == sorted(ids)
            with trio.fail_after(5):
                await arrived.wait()
            bob_inbox.read(pushed)
            assert [p["text"] for p in bob_inbox.letters] == ["hi 1", "hi 2", "hi 3"]
            assert bob_inbox.problems == []
            fetched = await bob.fetch(bob_inbox.mailbox())
            assert [i for i, _ in fetched.items] == ids and not fetched.more
            used = relay.server.used(circle.circle_id)
            await bob.ack(bob_inbox.mailbox(), ids[1])
            assert [i for i, _ in (await bob.fetch(bob_inbox.mailbox())).items] == ids[2:]
            assert relay.server.used(circle.circle_id) < used
            # A retried deposit (same bytes) is stored again; bob recognises the duplicate.
            again = seal_for(circle, m["alice"], m["bob"], 4, "once")
            await alice.deposit(bob_inbox.mailbox(), again)
            await alice.deposit(bob_inbox.mailbox(), again)
            bob_inbox.read((await bob.fetch(bob_inbox.mailbox(), ids[-1])).items)
            assert [p["text"] for p in bob_inbox.letters][-1] == "once"
            assert bob_inbox.problems == ["replay"]


async def test_an_offline_device_collects_its_mail_when_it_returns(tmp_path: Path) -> None:
    circle, m, _ = make_circle("a", "b")
    inbox = Inbox(circle, m["a"])
    async with running_relay(tmp_path / "relay") as relay:
        async with session(relay, m["b"], circle) as b:  # A is away
            for n in range(1, 6):
                await b.deposit(inbox.mailbox(), seal_for(circle, m["b"], m["a"], n, f"while away {n}"))
        client = RelayClient(relay.address, m["a"].dh, circle.records, min_backoff_s=0.01)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            watch = await client.watch(inbox.mailbox())
            with trio.fail_after(5):
                await watch.wait()
                items = list((await client.fetch(inbox.mailbox())).items)
            assert len(items) == 5
            inbox.read(items)
            await client.ack(inbox.mailbox(), items[-1][0])
            assert (await client.fetch(inbox.mailbox())).items == ()
            nursery.cancel_scope.cancel()
    assert [p["text"] for p in inbox.letters] == [f"while away {n}" for n in range(1, 6)]
    assert inbox.problems == []


async def test_pushes_are_hints_and_the_device_pulls_what_it_can_take(tmp_path: Path) -> None:
    """A watched mailbox gets hints (relay.envelopes without items), never the envelopes:
    the device fetches them in runs of the size it asks for, so nothing is pushed at it
    that it would have to drop."""
    circle, m, _ = make_circle("a", "b")
    inbox = Inbox(circle, m["a"])
    count = 40
    pushed: list[Any] = []
    async with running_relay(tmp_path / "relay", limits=Limits(rate_per_s=1e6, burst=1e6)) as relay:
        async with session(relay, m["b"], circle) as b:
            for n in range(1, count + 1):
                await b.deposit(inbox.mailbox(), seal_for(circle, m["b"], m["a"], n, f"letter {n}"))
        hinted = trio.Event()

        def on_push(envelopes: Any) -> None:
            pushed.append(envelopes)
            hinted.set()

        async with session(relay, m["a"], circle, on_push=on_push) as a:
            await a.subscribe(inbox.mailbox(), notify=True)
            with trio.fail_after(5):
                await hinted.wait()
            items: list[Any] = []
            more = True
            while more:
                answer = await a.fetch(inbox.mailbox(), items[-1][0] if items else 0, limit=8)
                assert len(answer.items) <= 8
                items.extend(answer.items)
                more = answer.more
    assert pushed and all(p.items == () and p.more for p in pushed)
    inbox.read(items)
    assert [p["text"] for p in inbox.letters] == [f"letter {n}" for n in range(1, count + 1)]
    assert inbox.problems == []


async def test_the_client_reconnects_and_resumes_its_subscription(tmp_path: Path) -> None:
    circle, m, _ = make_circle("a", "b")
    inbox = Inbox(circle, m["a"])
    storage_path = tmp_path / "relay"
    async with running_relay(storage_path) as relay:
        port, static = relay.port, relay.static
        client = RelayClient(relay.address, m["a"].dh, circle.records, min_backoff_s=0.01,
                             max_backoff_s=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            watch = await client.watch(inbox.mailbox())
            await watch.wait()  # the first hint comes with watching
            async with session(relay, m["b"], circle) as b:
                await b.deposit(inbox.mailbox(), seal_for(circle, m["b"], m["a"], 1, "before"))
            with trio.fail_after(5):
                await watch.wait()
                (first,) = (await client.fetch(inbox.mailbox())).items
            relay.cancel.cancel()  # the relay goes away...
            async with running_relay(storage_path, port=port, static=static) as again:
                async with session(again, m["b"], circle) as b:  # ...and comes back
                    await b.deposit(inbox.mailbox(), seal_for(circle, m["b"], m["a"], 2, "after"))
                with trio.fail_after(5):
                    await watch.wait()  # the new session, or the deposit's hint
                    (second,) = (await client.fetch(inbox.mailbox(), first[0])).items
                assert client.connects == 2 and client.connected
                nursery.cancel_scope.cancel()
    inbox.read([first, second])
    assert [p["text"] for p in inbox.letters] == ["before", "after"]
    assert inbox.problems == []  # nothing twice, nothing missing


async def test_a_relay_restarted_empty_is_read_from_the_start(tmp_path: Path) -> None:
    """Same key and port, wiped storage: its ids start again at 1. The client learns of the
    new incarnation at registration, tells its owner (which resets its cursor) and hints the
    watched mailbox, so the owner reads from id 0 instead of skipping what is there."""
    circle, m, _ = make_circle("a", "b")
    inbox = Inbox(circle, m["a"])
    seen: list[tuple[bytes | None, bytes]] = []
    cursor = 0  # the owner's (relaylink keeps it in the store)

    def on_incarnation(previous: bytes | None, new: bytes) -> None:
        nonlocal cursor
        seen.append((previous, new))
        if previous is not None:
            cursor = 0

    async with running_relay(tmp_path / "first") as relay:
        port, static = relay.port, relay.static
        first_incarnation = relay.server.storage.incarnation()
        client = RelayClient(relay.address, m["a"].dh, circle.records, min_backoff_s=0.01,
                             max_backoff_s=0.05, on_incarnation=on_incarnation)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            watch = await client.watch(inbox.mailbox())
            await watch.wait()  # the first hint comes with watching
            async with session(relay, m["b"], circle) as b:
                for n in (1, 2):
                    await b.deposit(inbox.mailbox(), seal_for(circle, m["b"], m["a"], n, f"old {n}"))
            first: list[tuple[int, bytes]] = []
            with trio.fail_after(5):
                while len(first) < 2:
                    await watch.wait()
                    first += (await client.fetch(inbox.mailbox(), cursor)).items
                    cursor = first[-1][0] if first else cursor
            relay.cancel.cancel()  # the relay goes away and comes back with an empty disk
            async with running_relay(tmp_path / "wiped", port=port, static=static) as again:
                assert again.server.storage.incarnation() != first_incarnation
                async with session(again, m["b"], circle) as b:
                    await b.deposit(inbox.mailbox(), seal_for(circle, m["b"], m["a"], 3, "new"))
                with trio.fail_after(5):
                    while client.incarnation != again.server.storage.incarnation():
                        await watch.wait()
                    assert cursor == 0  # reset before anything of the new one was read
                    (second,) = (await client.fetch(inbox.mailbox(), cursor)).items
                assert second[0] == 1  # numbered from 1 again, and not skipped
                nursery.cancel_scope.cancel()
    assert seen == [(None, first_incarnation), (first_incarnation, client.incarnation)]
    inbox.read([*first, second])
    assert [p["text"] for p in inbox.letters] == ["old 1", "old 2", "new"]
    assert inbox.problems == []


async def test_a_task_waiting_for_the_session_gets_it_after_failed_attempts(tmp_path: Path) -> None:
    """The first address of the relay is down: the client fails over to the second. A task
    that was already waiting (a mailbox drain at start) is woken by that session, not left
    on an event the failed attempt replaced."""
    circle, m, _ = make_circle("a")
    async with running_relay(tmp_path) as relay:
        down = await trio.open_tcp_listeners(0, host="127.0.0.1")
        down_port = down[0].socket.getsockname()[1]
        await down[0].aclose()  # nothing listens there any more
        dead = relay_address("127.0.0.1", down_port, relay.static.public)
        client = RelayClient(dead, m["a"].dh, circle.records, alternates=[relay.address],
                             min_backoff_s=0.01, max_backoff_s=0.05)
        async with trio.open_nursery() as nursery:
            waited = trio.Event()

            async def waiter() -> None:
                await client.wait_connected()
                waited.set()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()  # waiting before the first attempt
            nursery.start_soon(client.run)
            with trio.fail_after(5):
                await waited.wait()
            assert client.address == RelayAddress.parse(relay.address)
            nursery.cancel_scope.cancel()


def test_the_storage_incarnation_is_made_with_the_database(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "one")
    incarnation = storage.incarnation()
    storage.close()
    again = open_storage(tmp_path / "one")
    other = open_storage(tmp_path / "two")
    try:
        assert len(incarnation) == 16
        assert again.incarnation() == incarnation  # a restart is the same incarnation
        assert other.incarnation() != incarnation  # a new database is a new one
    finally:
        again.close()
        other.close()


async def test_two_relays_duplicates_are_recognised_and_one_wiped_loses_nothing(tmp_path: Path) -> None:
    circle, m, _ = make_circle("a", "b")
    inbox = Inbox(circle, m["a"])
    envelopes = [seal_for(circle, m["b"], m["a"], n, f"copy {n}") for n in (1, 2, 3)]
    async with running_relay(tmp_path / "one") as one, running_relay(tmp_path / "two") as two:
        for relay in (one, two):
            async with session(relay, m["b"], circle) as b:
                for envelope in envelopes:
                    await b.deposit(inbox.mailbox(), envelope)
        one.server.storage.delete_through(circle.circle_id, inbox.mailbox(), 10**9)  # wiped
        for relay in (one, two):
            async with session(relay, m["a"], circle) as a:
                inbox.read((await a.fetch(inbox.mailbox())).items)
        async with session(two, m["a"], circle) as a:
            inbox.read((await a.fetch(inbox.mailbox())).items)  # the same again
    assert [p["text"] for p in inbox.letters] == ["copy 1", "copy 2", "copy 3"]
    assert inbox.problems == ["replay"] * 3


async def test_acked_envelopes_and_replaced_backups_leave_the_relays_files(
    tmp_path: Path, relay_backend: str,
) -> None:
    """protocol/relay.md, Limits, "Purge": deleted bytes leave relay.sqlite3, -wal and -shm
    within 5 s (the WAL otherwise keeps the old page images until the relay stops)."""
    if relay_backend != "sqlite":
        pytest.skip("the bound is SQLite's: PostgreSQL's files belong to its server, whose "
                    "purge is a VACUUM that cannot overwrite freed bytes (README, relay.md)")
    circle, m, _ = make_circle("a", "b")
    inbox = Inbox(circle, m["a"])
    envelope_marker = b"envelope-" + secrets.token_hex(32).encode()
    backup_marker = b"backup-" + secrets.token_hex(32).encode()

    def files_holding() -> list[str]:
        return [p.name for p in sorted((tmp_path / "relay").iterdir())
                if p.is_file() and (envelope_marker in p.read_bytes()
                                    or backup_marker in p.read_bytes())]

    async with running_relay(tmp_path / "relay") as relay:
        async with session(relay, m["b"], circle) as b:
            await b.deposit(inbox.mailbox(), envelope_marker)  # opaque bytes to the relay
            await b.backup_put(0, 1, backup_marker)
        assert files_holding(), "the markers reached the disk"
        async with session(relay, m["a"], circle) as a:
            items = (await a.fetch(inbox.mailbox())).items
            assert [envelope for _, envelope in items] == [envelope_marker]
            await a.ack(inbox.mailbox(), items[-1][0])
            await a.backup_put(1, 2, b"a newer backup")
        try:
            await poll_until(lambda: not files_holding(), PURGE_BOUND_S, interval_s=0.05)
        except trio.TooSlowError:
            pass  # the assertion says where the bytes stayed
        assert files_holding() == []


# ---- authorisation -------------------------------------------------------------------


async def test_a_removed_member_is_cut_off_at_once(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice", "bob", "carol")
    old_records = circle.records()
    async with running_relay(tmp_path / "relay") as relay:
        async with session(relay, m["carol"], circle) as carol, \
                session(relay, m["alice"], circle) as alice:
            circle.remove_device(m["alice"].signer, m["carol"].sign_key, rng)
            await alice.register(circle.records())
            with trio.fail_after(5):
                await carol.wait_closed()
            assert carol.closed_error is not None and carol.closed_error.code == NOT_A_MEMBER
            with pytest.raises(RelayError) as refused:
                await carol.fetch(bytes(32))
            assert refused.value.code == NOT_A_MEMBER
        # Carol comes back with the records from before her removal: the relay kept the newer.
        with pytest.raises(RelayError) as refused:
            async with open_relay_session(relay.address, m["carol"].dh, old_records):
                pass
        assert refused.value.code == NOT_A_MEMBER
        async with session(relay, m["bob"], circle) as bob:  # bob is unaffected
            assert bob.registration is not None
    # The removal survives a restart of the relay.
    async with running_relay(tmp_path / "relay") as relay:
        with pytest.raises(RelayError, match=NOT_A_MEMBER):
            async with open_relay_session(relay.address, m["carol"].dh, old_records):
                pass


async def test_strangers_and_bad_records_are_refused(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice")
    stranger = make_member("stranger", rng)
    async with running_relay(tmp_path / "relay") as relay:
        with pytest.raises(RelayError, match=NOT_A_MEMBER):
            async with open_relay_session(relay.address, stranger.dh, circle.records()):
                pass
        with pytest.raises(RelayError, match=BAD_RECORDS):
            async with open_relay_session(relay.address, stranger.dh, [b"not a record"]):
                pass
        forged = bytearray(circle.records()[-1])
        forged[-1] ^= 1
        with pytest.raises(RelayError, match=BAD_RECORDS):
            async with open_relay_session(relay.address, m["alice"].dh,
                                          circle.records()[:-1] + [bytes(forged)]):
                pass


async def test_a_recovery_key_finds_its_circle_and_backup_with_no_records(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice", "bob")
    recovery_signer, recovery_dh, recovery_info = recovery_member(bytes(range(32)))
    circle.enrol_recovery(m["alice"].signer, recovery_info.claimed(recovery_signer), rng)
    keys = current_keys(circle, m["alice"])
    async with running_relay(tmp_path / "relay") as relay, \
            session(relay, m["alice"], circle) as alice:
        await alice.backup_put(0, 1, seal_backup(
            keys=keys, circle_id=circle.circle_id, signer=m["alice"].signer, version=1,
            snapshot={"note": "everything"}, rng=rng))
    # Every device is lost; the relay restarts; the words and the address remain.
    async with running_relay(tmp_path / "relay") as relay:
        with pytest.raises(RelayError, match=NOT_A_MEMBER):
            async with open_relay_session(relay.address, make_member("x", rng).dh, []):
                pass
        async with open_relay_session(relay.address, recovery_dh, []) as recovering:
            restored = Circle.from_records(await recovering.records())
            stored = await recovering.backup_get()
    assert restored.circle_id == circle.circle_id and stored is not None
    readable = restored.readable_epochs(recovery_dh)
    backup = open_backup(stored.blob, circle_id=circle.circle_id, version=stored.version,
                         keys_for_epoch=lambda n: epoch_keys(n, readable[n]) if n in readable else None,
                         is_signer_allowed=restored.state.is_member)
    assert backup.snapshot == {"note": "everything"}


async def test_a_relay_with_another_key_is_refused(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice")
    async with running_relay(tmp_path / "relay") as relay:
        real = RelayAddress.parse(relay.address)
        impostor = RelayAddress(real.host, real.port, DHKeyPair.generate(rng).public)
        with pytest.raises(UnauthorizedPeer):
            async with open_relay_session(impostor, m["alice"].dh, circle.records()):
                pass


async def test_malformed_and_unregistered_frames_get_an_error_then_a_close(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice")
    host_port, key = "127.0.0.1", RelayAddress
    async with running_relay(tmp_path / "relay") as relay:
        address = key.parse(relay.address)

        async def raw() -> Any:
            return await connect_secure(host_port, address.port, static=m["alice"].dh,
                                        authorize=lambda k: k == address.key)

        cases = [
            ([{"t": "relay.fetch", "rid": 1, "mailbox": bytes(32), "after": 0}], NOT_REGISTERED),
            ([{"t": "relay.register", "rid": 1, "records": circle.records()},
              {"t": "relay.fetch", "rid": 2, "mailbox": b"short", "after": 0}], MALFORMED),
            ([{"t": "relay.register", "rid": 1, "records": circle.records()},
              {"t": "log.entries", "rid": 2}], UNKNOWN_TYPE),
            ([{"t": "relay.register", "rid": "one", "records": circle.records()}], MALFORMED),
        ]
        for frames, code in cases:
            connection = await raw()
            async with connection:
                for frame in frames:
                    await connection.send(frame)
                with trio.fail_after(5):
                    answers = []
                    with pytest.raises(PeerClosed):
                        while True:
                            answers.append(await connection.receive())
            assert answers[-1]["t"] == "relay.error" and answers[-1]["code"] == code, answers
        async with session(relay, m["alice"], circle) as alice:  # the relay is fine
            assert alice.registration is not None


# ---- limits --------------------------------------------------------------------------


async def test_quota_and_size_cap(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice", "bob")
    box = mailbox_id(current_keys(circle, m["bob"]), m["bob"].sign_key)
    limits = Limits(quota_bytes=3000, max_envelope_bytes=1500)
    async with running_relay(tmp_path / "relay", limits=limits) as relay, \
            session(relay, m["alice"], circle) as alice:
        ids = [await alice.deposit(box, bytes([n]) * 1000) for n in range(3)]
        with pytest.raises(RelayError) as refused:
            await alice.deposit(box, b"\x09" * 1000)
        assert refused.value.code == QUOTA_EXCEEDED and not refused.value.fatal
        with pytest.raises(RelayError) as refused:
            await alice.deposit(box, b"\x0a" * 1501)
        assert refused.value.code == TOO_LARGE
        await alice.ack(box, ids[0])  # frees 1000 bytes
        await alice.deposit(box, b"\x09" * 1000)
        assert relay.server.used(circle.circle_id) == 3000
        # A backup counts against the same quota.
        with pytest.raises(RelayError, match=QUOTA_EXCEEDED):
            await alice.backup_put(0, 1, b"b" * 10)


async def test_envelopes_expire_after_their_ttl(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice")
    box = bytes(32)
    async with running_relay(tmp_path / "relay", limits=Limits(ttl_s=100)) as relay, \
            session(relay, m["alice"], circle) as alice:
        await alice.deposit(box, b"old")
        relay.clock.now += 60
        await alice.deposit(box, b"newer")
        relay.clock.now += 41  # the first is past its TTL, the second is not
        assert [e for _, e in (await alice.fetch(box)).items] == [b"newer"]
        assert await relay.server.expire() == 3
        assert relay.server.used(circle.circle_id) == 5
        relay.clock.now += 60
        assert (await alice.fetch(box)).items == ()
        assert await relay.server.expire() == 5


async def test_rate_limit_answers_with_retry_after_and_keeps_the_connection(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice")
    limits = Limits(rate_per_s=0.001, burst=3)
    async with running_relay(tmp_path / "relay", limits=limits) as relay, \
            session(relay, m["alice"], circle) as alice:  # registering took one token
        await alice.fetch(bytes(32))
        await alice.fetch(bytes(32))
        with pytest.raises(RelayError) as refused:
            await alice.fetch(bytes(32))
        assert refused.value.code == RATE_LIMITED
        assert refused.value.retry_after is not None and refused.value.retry_after > 0
        assert alice.closed_error is None


async def test_backup_compare_and_swap(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice", "bob")
    keys = current_keys(circle, m["alice"])

    def blob(version: int) -> bytes:
        return seal_backup(keys=keys, circle_id=circle.circle_id, signer=m["alice"].signer,
                           version=version, snapshot={"records": circle.records()}, rng=rng)

    async with running_relay(tmp_path / "relay") as relay, \
            session(relay, m["alice"], circle) as alice, session(relay, m["bob"], circle) as bob:
        assert await alice.backup_get() is None
        await alice.backup_put(0, 1, blob(1))
        await bob.backup_put(1, 2, blob(2))
        with pytest.raises(RelayError) as refused:
            await alice.backup_put(1, 2, blob(2))  # alice's view is stale
        assert refused.value.code == CONFLICT
        stored = await alice.backup_get()
        assert stored is not None and stored.version == 2
        backup = open_backup(stored.blob, circle_id=circle.circle_id, version=stored.version,
                             keys_for_epoch=keys_of(circle, m["alice"]).get,
                             is_signer_allowed=circle.state.is_member)
        assert backup.snapshot == {"records": circle.records()}


# ---- what the relay keeps ------------------------------------------------------------


async def test_the_relay_stores_no_plaintext_and_no_keys(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice", "bob")
    keys = current_keys(circle, m["alice"])
    canaries = [f"CANARY-MESSAGE-{n}-plaintext".encode() for n in range(20)]
    async with running_relay(tmp_path / "relay") as relay, \
            session(relay, m["alice"], circle) as alice:
        box = mailbox_id(keys, m["bob"].sign_key)
        for n, canary in enumerate(canaries, start=1):
            envelope = seal_envelope(keys=keys, mailbox=box, signer=m["alice"].signer, seq=n,
                                     payload={"t": "log.entries", "body": canary}, rng=rng)
            await alice.deposit(box, envelope)
        await alice.backup_put(0, 1, seal_backup(
            keys=keys, circle_id=circle.circle_id, signer=m["alice"].signer, version=1,
            snapshot={"entries": canaries}, rng=rng))
        secrets = [circle.epoch_key(m["alice"].dh), keys.mailbox, keys.backup, keys.mailbox_id_key,
                   bytes(m["alice"].dh.private), bytes(m["alice"].signer.seed)]
        raw = stored_bytes(relay)
    assert len(raw) > 20 * 100  # the envelopes are in there, sealed
    for canary in canaries:
        assert canary not in raw and canary[:14] not in raw
    for secret in secrets:
        assert secret not in raw


# A relay that drops, reorders or tampers with envelopes, and one that serves an older
# backup, are caught by the daemon itself: tests/integration/test_cheating_relay.py and
# test_relay_misbehaviour.py.


# ---- clients that stall --------------------------------------------------------------


@pytest.fixture
def bare_server(tmp_path: Path) -> Iterator[RelayServer]:
    storage = SQLiteRelayStorage(tmp_path / DATABASE_FILE)
    yield RelayServer(storage, DHKeyPair.generate(seeded_rng(7)))
    storage.close()


async def test_a_client_that_never_handshakes_is_dropped(
    bare_server: RelayServer, autojump_clock: trio.abc.Clock
) -> None:
    server = bare_server
    _, server_side = trio.testing.memory_stream_pair()
    start = trio.current_time()
    await server.handle_stream(server_side)
    assert trio.current_time() - start == pytest.approx(HANDSHAKE_TIMEOUT_S)


async def test_a_client_that_never_registers_is_dropped(
    bare_server: RelayServer, autojump_clock: trio.abc.Clock
) -> None:
    server = bare_server
    client_side, server_side = trio.testing.memory_stream_pair()
    device = DHKeyPair.generate(seeded_rng(8))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_side)
        connection = await open_secure_connection(
            client_side, initiator=True, static=device, authorize=lambda key: True)
        start = trio.current_time()
        assert (await connection.receive())["code"] == NOT_REGISTERED  # told why, then closed
        with pytest.raises(PeerClosed):
            await connection.receive()
    assert trio.current_time() - start == pytest.approx(REGISTER_TIMEOUT_S, abs=0.1)


async def test_a_subscriber_that_stops_reading_is_dropped(
    bare_server: RelayServer, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The relay logs a repeated message once at WARNING and then at DEBUG (QuietLogger), and
    # that memory is per process: start this test with a fresh one, whatever ran before.
    monkeypatch.setattr(relay_server.quiet, "_seen", type(relay_server.quiet._seen)())
    # The relay verifies registrations in worker threads; under the mock clock a thread's
    # run looks idle, so the clock would jump past both ends' silence timers (which run
    # whatever the connection is doing) before the answer. Verify inline here.

    async def inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    circle, m, _ = make_circle("alice")
    server = bare_server
    box = bytes(32)
    # The backlog is written directly: no writer thread runs under the mock clock.
    server.storage.save_circle_records(circle.circle_id, circle.records())
    server.storage.add_envelopes([NewEnvelope(circle.circle_id, box, bytes([n]) * 60_000, 2e9)
                                  for n in range(50)])
    client_side, server_side = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        finished = trio.Event()

        async def serve() -> None:
            await server.handle_stream(server_side)
            finished.set()

        nursery.start_soon(serve)
        connection = await open_secure_connection(
            client_side, initiator=True, static=m["alice"].dh, authorize=lambda key: True)
        await connection.send({"t": "relay.register", "rid": 1, "records": circle.records()})
        assert (await connection.receive())["t"] == "relay.registered"
        await connection.send({"t": "relay.subscribe", "rid": 2, "mailbox": box, "after": 0})
        assert (await connection.receive())["t"] == "relay.ok"
        start = trio.current_time()  # and now the device never reads again
        await finished.wait()
    assert SEND_TIMEOUT_S <= trio.current_time() - start <= SEND_TIMEOUT_S + 1
    assert any("dropped" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


async def test_the_relay_client_paces_rate_limited_requests_on_the_same_session(tmp_path: Path) -> None:
    """A rate-limited request was never carried out: the keeping client waits the relay's
    retry_after and sends it again on the same session. Treating the refusal as a failed
    session (the daemon once reconnected, re-registered and was refused again) spends the
    tokens it is waiting for, and its deposits never drain."""
    circle, m, _ = make_circle("a", "b")
    inbox = Inbox(circle, m["a"])
    limits = Limits(rate_per_s=40.0, burst=3)  # a refusal waits about 25 ms
    async with running_relay(tmp_path / "relay", limits=limits) as relay:
        client = RelayClient(relay.address, m["a"].dh, circle.records, min_backoff_s=0.01)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            with trio.fail_after(10):
                await client.wait_connected()
                for n in range(12):  # four times the burst, back to back
                    await client.deposit(inbox.mailbox(), seal_for(circle, m["b"], m["a"], n + 1, f"n{n}"))
                session = client.session
                assert session is not None
                for _ in range(4):  # the daemon re-registers on the live session
                    await session.register(circle.records())
                items = list((await client.fetch(inbox.mailbox())).items)
            assert len(items) == 12
            assert client.connects == 1 and client.session is session
            nursery.cancel_scope.cancel()
