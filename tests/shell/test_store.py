"""The SQLite store: schema and migrations, durability of what committed, typed errors for a
full disk, a read-only directory and a damaged file, circle records and state."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from meshd.protocol.log import (
    CLEAR,
    DELETE,
    PUT,
    ZERO_HASH,
    Batch,
    Header,
    Write,
    compose_batch,
    verify_batch,
)
from meshd.store.db import SCHEMA_VERSION, Store, StoreCorrupt, StoreError, StoreFull, StoreReadOnly

from ..protocol.test_log import WALL_MS, allow_all, puts, signer

ME = signer(1)


def write(store: Store, writes: list[Write], *, durable: bool = True) -> None:
    seq, hash = store.tip(bytes(ME.public))
    store.commit_batch(compose_batch(ME, seq, hash, 0, WALL_MS + seq, writes), durable=durable)


def test_a_new_store_has_the_current_schema_and_is_private(tmp_path: Path) -> None:
    Store(tmp_path / "m.db").close()
    assert stat.S_IMODE((tmp_path / "m.db").stat().st_mode) == 0o600
    db = sqlite3.connect(tmp_path / "m.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_store_from_a_newer_meshd_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "m.db").close()
    db = sqlite3.connect(tmp_path / "m.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path / "m.db")


def test_an_empty_database_is_migrated(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "m.db").close()  # version 0, no tables
    store = Store(tmp_path / "m.db")
    write(store, puts(1))
    assert store.version_vector() == {bytes(ME.public): 1}


def test_everything_committed_is_there_after_reopening(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    write(store, puts(5))
    write(store, puts(3, prefix="q"))
    store.set_state("k", b"v")
    store.close()
    store = Store(tmp_path / "m.db")
    assert store.version_vector() == {bytes(ME.public): 8}
    assert store.get_state("k") == b"v"
    message = store.batch_since(bytes(ME.public), 0, 1 << 20)
    assert message is not None
    verified = verify_batch(Batch.from_message(message), 0, ZERO_HASH, allow_all)
    assert len(verified) == 8 and verified.last_hash == store.tip(bytes(ME.public))[1]
    assert [r[1] for r in store.read("s", b"", 100)] == [f"r{i}" for i in range(5)] + [
        f"q{i}" for i in range(3)]


def test_batches_end_at_signed_heads_past_the_size_asked_for(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    for i in range(10):
        write(store, puts(4, prefix=f"{i}-"))  # a head every 4 entries
    message = store.batch_since(bytes(ME.public), 0, 1)
    assert message is not None and message["head"]["seq"] == 4
    message = store.batch_since(bytes(ME.public), 4, 700)
    assert message is not None and message["head"]["seq"] % 4 == 0
    assert sum(map(len, message["headers"])) >= 700 - 4 * 200
    assert store.batch_since(bytes(ME.public), 40, 1) is None


def test_a_full_disk_is_a_clear_error_and_loses_nothing_committed(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    write(store, puts(10))
    store.set_max_pages(store.page_count() + 8)
    with pytest.raises(StoreFull, match="full"):
        for _ in range(1000):
            write(store, puts(50, body=bytes(2000), prefix="big"))
    vector = store.version_vector()
    # The failed batch left no trace: the tip, the view and the file are as committed.
    assert store.integrity_check() == "ok"
    seq = vector[bytes(ME.public)]
    assert [Header.decode(h).seq for h in store.headers()] == list(range(1, seq + 1))
    store.set_max_pages(1 << 30)
    write(store, puts(1, prefix="after"))
    assert store.version_vector()[bytes(ME.public)] == seq + 1
    store.close()
    assert Store(tmp_path / "m.db").version_vector() == {bytes(ME.public): seq + 1}


def test_state_writes_on_a_full_disk_fail_cleanly(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    store.set_state("keep", b"1")
    store.set_max_pages(store.page_count())
    with pytest.raises(StoreFull):
        store.add_circle_records([os.urandom(3000) for _ in range(20)])
    assert store.get_state("keep") == b"1" and store.circle_records() == []


def _as_another_user(check: Callable[[], dict[str, str]]) -> dict[str, str]:
    """Run check in a forked child without root (root ignores directory permissions)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            result = check()
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            result = {"unexpected": repr(err)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)  # type: ignore[no-any-return]


def _outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except StoreError as err:
        return f"{type(err).__name__}: {err}"
    return "ok"


def test_a_read_only_directory_is_a_clear_error() -> None:
    directory = Path(tempfile.mkdtemp())
    try:
        os.chmod(directory, 0o755)
        if os.geteuid() == 0:
            os.chown(directory, 65534, 65534)

        def check() -> dict[str, str]:
            store = Store(directory / "m.db")
            store.set_state("k", b"v")
            store.close()
            os.chmod(directory, 0o555)
            os.chmod(directory / "m.db", 0o400)
            result = {
                "reopen": _outcome(lambda: Store(directory / "m.db").set_state("k", b"w")),
                "create": _outcome(lambda: Store(directory / "new.db")),
            }
            os.chmod(directory, 0o755)
            os.chmod(directory / "m.db", 0o600)
            reopened = Store(directory / "m.db")
            result["kept"] = repr(reopened.get_state("k"))
            return result

        result = _as_another_user(check)
    finally:
        os.chmod(directory, 0o755)
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
    assert result["reopen"].startswith(StoreReadOnly.__name__), result
    assert result["create"].startswith("StoreReadOnly") and "writable" in result["create"]
    assert result["kept"] == "b'v'"


def test_a_damaged_file_is_reported_as_corrupt(tmp_path: Path) -> None:
    (tmp_path / "m.db").write_bytes(b"this is not a database" * 200)
    with pytest.raises(StoreCorrupt, match="damaged"):
        Store(tmp_path / "m.db")


def test_deleted_bodies_leave_no_bytes_in_the_file(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    secret = b"SECRET-" + os.urandom(8).hex().encode()
    write(store, [Write("s", "x", PUT, secret * 20)])
    write(store, [Write("s", "x", 1)])  # delete
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # noqa: SLF001
    store.close()
    assert secret not in (tmp_path / "m.db").read_bytes()


@pytest.mark.parametrize("op", ["delete", "clear", "supersede"])
def test_a_commit_that_purged_is_flagged_and_purge_empties_every_file(
        tmp_path: Path, op: str) -> None:
    store = Store(tmp_path / "m.db")
    secret = b"SECRET-" + os.urandom(8).hex().encode()
    write(store, [Write("s", "x", PUT, secret * 20), Write("s", "y", PUT, b"other")])
    assert store.purge_pending is False  # new puts purge nothing
    removal = {"delete": Write("s", "x", DELETE), "clear": Write("s", "", CLEAR),
               "supersede": Write("s", "x", PUT, b"newer")}[op]
    write(store, [removal])
    assert store.purge_pending is True

    def holding() -> list[str]:
        return [p.name for p in tmp_path.iterdir() if secret in p.read_bytes()]

    assert "m.db-wal" in holding()  # the old page image: what purge is for
    store.purge()  # while the store stays open, as in the daemon
    assert store.purge_pending is False
    assert holding() == []
    store.close()


def test_circle_records_keep_order_and_ignore_duplicates(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    store.add_circle_records([b"genesis", b"add"])
    store.add_circle_records([b"add", b"epoch"])
    assert store.circle_records() == [b"genesis", b"add", b"epoch"]


def test_state_is_a_small_key_value_table(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    assert store.get_state("relay") is None
    store.set_state("relay", b"a")
    store.set_state("relay", b"b")
    assert store.get_state("relay") == b"b"


def test_reads_page_through_a_stream_in_view_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    write(store, puts(7))
    first = store.read("s", b"", 3)
    rest = store.read("s", first[-1][0], 10)
    assert [r[1] for r in first + rest] == [f"r{i}" for i in range(7)]
    assert store.streams() == [("s", 7)]
    assert store.read("nothing", b"", 10) == []


def test_the_page_cache_of_both_connections_is_bounded(tmp_path: Path) -> None:
    # Two connections at 32 MiB each filled up as the log grew: 64 MB of a daemon's RSS,
    # against an idle target of 45 MB (issue 20). Both are capped together at 16 MiB.
    store = Store(tmp_path / "meshd.db")
    try:
        caches = [c.execute("PRAGMA cache_size").fetchone()[0] for c in (store._db, store._reader)]
    finally:
        store.close()
    assert all(size < 0 for size in caches)  # in KiB, not pages
    assert -sum(caches) <= 16 * 1024
