"""What runs after a COMMIT (the WAL bound: a stat of the WAL file, waking or starting the
checkpointer thread, meshd/store/checkpoint.py) must not turn a committed transaction into a
reported failure. If it raised, the caller would be told a durable write failed: the group
commit would retry each of its units alone and commit them a second time (meshd/store/
groupcommit.py), and LogService would neither move vector_version nor wake the peers.

The faults are injected where the operating system gives them: the thread that cannot start
(RuntimeError "can't start new thread", at the process's thread limit) and the stat of the WAL
file that fails (EIO)."""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from meshd.protocol.log import PUT, Write, compose_batch
from meshd.store import checkpoint
from meshd.store.db import Store

from ..protocol.test_log import WALL_MS, signer
from .test_logsync import service

ME = signer(1)


class NoCheckpointThread(threading.Thread):
    """threading.Thread, except that the checkpointer's cannot start (the thread limit)."""

    def start(self) -> None:
        if self.name == "meshd-checkpoint":
            raise RuntimeError("can't start new thread")
        super().start()


@pytest.fixture
def no_checkpoint_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint.threading, "Thread", NoCheckpointThread)


def fail_wal_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    real_stat = os.stat

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(path).endswith("-wal"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "stat", stat)


@pytest.fixture
def wal_stat_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    fail_wal_stat(monkeypatch)


def committed_entries(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM entries").fetchone()[0])


def commit_one(store: Store) -> None:
    seq, hash = store.tip(bytes(ME.public))
    store.commit_batch(compose_batch(ME, seq, hash, 0, WALL_MS + seq, [Write("s", "r", PUT, b"x")]),
                       durable=True)


@pytest.mark.usefixtures("no_checkpoint_thread")
def test_a_commit_stands_when_the_checkpointer_thread_cannot_start(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db", wal_soft_bytes=1)  # every commit asks for a checkpoint
    commit_one(store)  # committed: it must say so
    commit_one(store)  # and the next commit tries to start the thread again, and goes on
    assert store.tip(bytes(ME.public))[0] == 2
    assert store.checkpointer.error is not None  # why there is no checkpointer (logged)
    store.checkpointer.drain()  # returns: there is no thread to wait for
    store.close()
    assert committed_entries(tmp_path / "m.db") == 2


@pytest.mark.usefixtures("wal_stat_fails")
def test_a_commit_stands_when_the_wal_file_cannot_be_measured(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    commit_one(store)
    assert store.tip(bytes(ME.public))[0] == 1
    store.close()
    assert committed_entries(tmp_path / "m.db") == 1


async def test_a_group_whose_wal_bound_fails_is_acknowledged_once_and_not_committed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two writers share one group: a failure reported after its COMMIT made the group commit
    # retry each unit alone, committing both again (4 entries for 2 writes), all refused.
    logs = service(tmp_path, 1)
    fail_wal_stat(monkeypatch)  # from now on (the store is open)
    version = logs.vector_version
    results: list[dict[str, Any]] = []

    async def writer(i: int) -> None:
        results.append(await logs.write("chat", None, f"message {i}".encode()))

    async with trio.open_nursery() as nursery:
        for i in range(2):
            nursery.start_soon(writer, i)
    assert sorted(r["seq"] for r in results) == [1, 2]
    assert logs.group_commit.groups == 1
    assert committed_entries(logs.store.path) == 2
    assert logs.vector_version != version  # the peers' vectors see the new entries
    logs.store.close()
