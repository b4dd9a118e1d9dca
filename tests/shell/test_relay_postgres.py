"""The PostgreSQL relay storage under several writers: each storage object here stands for
one relay process (its own connection pool), all on one real database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.relay import INTERNAL, RATE_LIMITED, Limits, RelayError
from meshd.relay.storage import NewEnvelope, StorageEvent

from ..protocol.harness import seeded_rng
from .test_relay import make_circle, running_relay, session

psycopg = pytest.importorskip("psycopg")
from meshd.relay import postgres as pg  # noqa: E402
from meshd.relay.postgres import PostgresRelayStorage, PostgresStorageError  # noqa: E402

CIRCLE = b"c" * 32
BOX = b"m" * 32


@pytest.fixture
def relays(postgres_dsn: str) -> Iterator[list[PostgresRelayStorage]]:
    opened = [PostgresRelayStorage(postgres_dsn) for _ in range(3)]
    yield opened
    for storage in opened:
        storage.close()


def run_threads(*targets: Any) -> None:
    errors: list[BaseException] = []

    def guarded(target: Any) -> None:
        try:
            target()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_the_schema_is_versioned_and_migrated_once(postgres_dsn: str) -> None:
    first = PostgresRelayStorage(postgres_dsn)
    second = PostgresRelayStorage(postgres_dsn)  # finds it migrated
    assert first.schema_version == second.schema_version == len(pg.MIGRATIONS)
    with first._pool.connection() as db:  # noqa: SLF001
        assert db.execute("SELECT version FROM relay_schema").fetchall() == [(len(pg.MIGRATIONS),)]
        db.execute("UPDATE relay_schema SET version = version + 1")
    first.close()
    second.close()
    with pytest.raises(PostgresStorageError, match="upgrade meshd"):
        PostgresRelayStorage(postgres_dsn)


def test_a_bad_database_is_a_typed_error_without_the_password(postgres_dsn: str) -> None:
    dsn = postgres_dsn.replace("postgresql:///", "postgresql://someone:s3cret-pw@/") \
        .replace("user=postgres", "user=nobody-here")
    with pytest.raises(PostgresStorageError) as refused:
        PostgresRelayStorage(dsn + "&connect_timeout=2")
    assert "s3cret-pw" not in str(refused.value)


def test_a_cursor_never_passes_an_id_another_process_has_not_committed(
    relays: list[PostgresRelayStorage],
) -> None:
    # Three processes deposit into one mailbox while a device reads it with its cursor, as
    # a subscriber does. Ids drawn from one sequence commit out of order unless the mailbox
    # is locked before they are drawn; a reader would then skip the late one for ever.
    per_writer, writers = 150, relays
    done = threading.Event()
    seen: list[int] = []

    def writer(storage: PostgresRelayStorage, n: int) -> None:
        for k in range(per_writer):
            storage.add_envelopes([NewEnvelope(CIRCLE, BOX, f"{n}-{k}".encode(), 2e9)])

    def reader() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            items, _ = relays[0].envelopes_after(CIRCLE, BOX, cursor, now=0, limit=1000,
                                                 max_bytes=1 << 30)
            seen.extend(i for i, _ in items)
            cursor = items[-1][0] if items else cursor
            if finished and not items:
                return

    reading = threading.Thread(target=reader)
    reading.start()
    run_threads(*(lambda s=s, n=n: writer(s, n) for n, s in enumerate(writers)))
    done.set()
    reading.join()
    everything, _ = relays[0].envelopes_after(CIRCLE, BOX, 0, now=0, limit=10_000,
                                              max_bytes=1 << 30)
    assert len(everything) == per_writer * len(writers)
    assert seen == [i for i, _ in everything]  # each once, in order, none skipped


def test_backup_compare_and_swap_has_one_winner_per_version(
    relays: list[PostgresRelayStorage],
) -> None:
    # Every process tries to move the backup from each version it reads to the next: at
    # every version exactly one of them wins, and a loser is told the version that won.
    target = 60
    wins: list[tuple[int, int]] = []  # (version written, writer)
    lock = threading.Lock()

    def writer(storage: PostgresRelayStorage, n: int) -> None:
        while True:
            current = storage.backup(CIRCLE)
            version = current.version if current else 0
            if version >= target:
                return
            conflict = storage.put_backup(CIRCLE, version, version + 1, f"{n}:{version + 1}".encode())
            if conflict is None:
                with lock:
                    wins.append((version + 1, n))
            else:
                assert conflict.version > version

    run_threads(*(lambda s=s, n=n: writer(s, n) for n, s in enumerate(relays)))
    assert sorted(v for v, _ in wins) == list(range(1, target + 1))
    stored = relays[0].backup(CIRCLE)
    assert stored is not None and stored.version == target
    assert stored.blob == f"{dict(wins)[target]}:{target}".encode()
    assert len({n for _, n in wins}) > 1  # they really competed


def test_records_updates_from_several_processes_are_never_lost(
    relays: list[PostgresRelayStorage],
) -> None:
    def adder(storage: PostgresRelayStorage, n: int) -> None:
        for k in range(30):
            storage.update_circle_records(CIRCLE, lambda stored, k=k: [
                *(stored or []), f"{n}-{k}".encode()])

    run_threads(*(lambda s=s, n=n: adder(s, n) for n, s in enumerate(relays)))
    stored = relays[1].circle_records(CIRCLE)
    assert stored is not None and len(stored) == 90 and len(set(stored)) == 90


def test_one_process_sweeps_at_a_time(relays: list[PostgresRelayStorage]) -> None:
    a, b, _ = relays
    a.add_envelopes([NewEnvelope(CIRCLE, BOX, b"x" * 10, 100.0)])
    with a._pool.connection() as db, db.transaction():  # noqa: SLF001 - another sweeper
        db.execute("SELECT pg_advisory_xact_lock(%s)", (pg.SWEEP_LOCK,))
        assert b.delete_expired(now=200.0) == {}  # skipped: somebody is sweeping
    assert b.delete_expired(now=200.0) == {CIRCLE: 10}
    assert a.delete_expired(now=200.0) == {}


async def test_each_process_hears_the_others_changes_not_its_own(
    relays: list[PostgresRelayStorage],
) -> None:
    a, b, _ = relays
    await trio.to_thread.run_sync(a.add_envelopes, [NewEnvelope(CIRCLE, BOX, b"12345", 2e9)])
    await trio.to_thread.run_sync(lambda: a.put_backup(CIRCLE, 0, 1, b"backup"))
    await trio.to_thread.run_sync(lambda: a.delete_through(CIRCLE, BOX, 10**9))
    await trio.to_thread.run_sync(lambda: a.save_circle_records(CIRCLE, [b"r"]))
    expected = [StorageEvent("deposit", CIRCLE, BOX, 5), StorageEvent("usage", CIRCLE, delta=6),
                StorageEvent("usage", CIRCLE, delta=-5), StorageEvent("records", CIRCLE)]
    heard: list[StorageEvent] = []
    with trio.fail_after(10):
        while len(heard) < len(expected):
            heard.extend(await b.events())
    assert heard == expected
    # a's own events are not reported back to it: the first it hears is b's, sent after.
    await trio.to_thread.run_sync(b.add_envelopes, [NewEnvelope(CIRCLE, BOX, b"from b", 2e9)])
    with trio.fail_after(10):
        assert await a.events() == [StorageEvent("deposit", CIRCLE, BOX, 6)]


async def test_a_lost_listening_connection_is_reopened_and_reported_as_resync(
    relays: list[PostgresRelayStorage],
) -> None:
    a, b, _ = relays
    with a._pool.connection() as db:  # noqa: SLF001 - the database drops b's listener
        killed = db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE query LIKE 'LISTEN%%' AND pid = %s",
                            (b._listener.connection.info.backend_pid,)).fetchall()  # noqa: SLF001
    assert killed == [(True,)]
    with trio.fail_after(10):
        # Changes made while it was gone are not reported one by one: b must re-read.
        assert await b.events() == [StorageEvent("resync")]
    await trio.to_thread.run_sync(a.add_envelopes, [NewEnvelope(CIRCLE, BOX, b"after", 2e9)])
    with trio.fail_after(10):
        assert await b.events() == [StorageEvent("deposit", CIRCLE, BOX, 5)]


async def test_a_database_restart_fails_requests_not_the_relay(
    tmp_path: Path, postgres_dsn: str
) -> None:
    # The database drops every connection of the relay (a restart, a failover): requests
    # meanwhile get `internal` (retry later) on a connection that stays open, and the
    # relay process carries on once the database answers again.
    circle, m, _ = make_circle("alice")
    box = bytes(32)
    storage = PostgresRelayStorage(postgres_dsn)
    async with running_relay(tmp_path / "relay", storage=storage) as relay, \
            session(relay, m["alice"], circle) as alice:
        await alice.deposit(box, b"before")
        with psycopg.connect(postgres_dsn, autocommit=True) as db:
            dropped = db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
        assert dropped and all(ok for (ok,) in dropped)
        failures = 0
        while True:  # each dead pooled connection fails one request, then is discarded
            try:
                items = (await alice.fetch(box)).items
                break
            except RelayError as err:
                assert err.code == INTERNAL and not err.fatal
                failures += 1
                assert failures <= pg.POOL_SIZE
        assert failures >= 1
        assert [e for _, e in items] == [b"before"]
        await alice.deposit(box, b"after")
        assert alice.closed_error is None


async def test_rate_limits_count_a_key_at_every_process(tmp_path: Path, postgres_dsn: str) -> None:
    # Two relay processes (here two servers, each with its own storage connection) on one
    # database. A key that spent most of its burst at one has little left at the other.
    circle, m, _ = make_circle("alice")
    key = bytes(m["alice"].dh.public)
    limits = Limits(rate_per_s=0.001, burst=10)
    static = DHKeyPair.generate(seeded_rng(5))
    async with running_relay(tmp_path / "one", storage=PostgresRelayStorage(postgres_dsn),
                             limits=limits, static=static) as one, \
            running_relay(tmp_path / "two", storage=PostgresRelayStorage(postgres_dsn),
                          limits=limits, static=static) as two, \
            session(one, m["alice"], circle) as at_one:  # registering: 1 token
        for _ in range(7):
            await at_one.fetch(bytes(32))  # 8 of 10 spent at one

        def tokens_at_two() -> float:
            bucket = two.server._buckets.get(key)  # noqa: SLF001 - the shared count under test
            return bucket._tokens if bucket is not None else 10.0  # noqa: SLF001

        # The count may arrive in more than one share, and the bucket refills a little
        # between them: at most rate x the bounded wait, far below the one token that
        # would let an 11th request through.
        refill = limits.rate_per_s * 10
        with trio.fail_after(10):  # two hears of it within RATE_SHARE_S (bounded poll)
            while tokens_at_two() > 2.0 + refill:  # noqa: ASYNC110
                await trio.sleep(0.02)
        async with session(two, m["alice"], circle) as at_two:  # registering: the 9th
            await at_two.fetch(bytes(32))  # the 10th
            with pytest.raises(RelayError) as refused:
                await at_two.fetch(bytes(32))
            assert refused.value.code == RATE_LIMITED


def test_the_incarnation_is_created_with_the_database_and_shared(postgres_dsn: str,
                                                                  postgres: Any) -> None:
    first = PostgresRelayStorage(postgres_dsn)
    second = PostgresRelayStorage(postgres_dsn)
    assert len(first.incarnation()) == pg.INCARNATION_BYTES
    assert first.incarnation() == second.incarnation()  # one relay, one incarnation
    first.add_envelopes([NewEnvelope(CIRCLE, BOX, b"x", 2e9)])
    first.delete_through(CIRCLE, BOX, 10**9)
    assert first.purge() is True
    first.close()
    second.close()
    other = PostgresRelayStorage(postgres.new_database())  # a new (or wiped) database
    assert other.incarnation() != second.incarnation()
    other.close()
