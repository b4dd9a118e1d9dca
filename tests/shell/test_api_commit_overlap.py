"""Pipelined batch requests and the group commit (issue 16): batch n+1 of a connection is
queued in the group commit while batch n's transaction is still committing, so the writer
thread takes it as soon as that commit returns; answers stay in request order and each is
sent only once its own group has committed (meshd/api/httpserver.call_reading_ahead)."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from meshd.api.routes import open_unix_listener, serve_api
from meshd.store.groupcommit import GroupCommit
from tests.shell.test_api_hotpath import post, read_answer, short_dir  # noqa: F401 (a fixture)

HELD_S = 10  # a bound for the held commit's wait, never reached by a passing run


class Control:
    """write_puts through a real GroupCommit whose first transaction is held (in the writer
    thread) until `release`; every event is logged in order, from either thread."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.first_committing = trio.Event()
        self.second_queued = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        self.stored = 0
        self.group_commit: GroupCommit[int] = GroupCommit(self.commit, lambda _first: None)

    def note(self, event: str) -> None:
        with self.lock:
            self.log.append(event)

    def require_member(self) -> None:
        return None

    def commit(self, writes: list[Any]) -> int:  # (the writer thread)
        first = self.stored + 1
        self.note(f"commit {[bytes(w) for w in writes]}")
        if first == 1:
            self.token.run_sync_soon(self.first_committing.set)
            assert self.release.wait(HELD_S), "the held commit was never released"
        self.stored += len(writes)
        self.note(f"committed {first}")
        return first

    async def write_puts(self, stream: str, bodies: list[bytes]) -> list[tuple[str, int]]:
        self.note(f"submit {bodies}")
        if len(self.log) > 1:
            self.second_queued.set()
        first, offset = await self.group_commit.submit(bodies)  # type: ignore[arg-type]
        self.note(f"answered {bodies}")
        return [(f"r{first + offset + i}", first + offset + i) for i in range(len(bodies))]


@pytest.fixture
async def served(nursery: trio.Nursery, short_dir: Path) -> AsyncIterator[tuple[Control, Path]]:  # noqa: F811
    control = Control()
    path = short_dir / "meshd.sock"
    listener = await open_unix_listener(path)
    await nursery.start(partial(serve_api, control, listener, allowed_uids=set()))  # type: ignore[arg-type]
    yield control, path
    control.release.set()  # (a failed test must not leave the writer thread waiting)


def lines(*texts: str) -> bytes:
    return "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()


def seqs(answers: Sequence[dict[str, Any]]) -> list[list[int]]:
    return [[r["seq"] for r in a["results"]] for a in answers]


async def test_the_next_batch_is_queued_while_this_ones_transaction_commits(
        served: tuple[Control, Path]) -> None:
    control, path = served
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(post("/v1/batch?stream=s", lines("a", "b"))
                              + post("/v1/batch?stream=s", lines("c")))
        with trio.fail_after(HELD_S):
            await control.first_committing.wait()
            # On main the second request reaches the daemon only once the first is
            # answered, i.e. after its commit returns: this wait would never end.
            await control.second_queued.wait()
        assert control.log[0] == "submit [b'a', b'b']" and "submit [b'c']" in control.log
        assert "committed 1" not in control.log  # (still held)
        control.release.set()
        buffer = bytearray()
        answers = [json.loads((await read_answer(stream, buffer))[1]) for _ in range(2)]
    assert seqs(answers) == [[1, 2], [3]]
    answered_after_commit(control.log)


def answered_after_commit(log: list[str]) -> None:
    """Each batch's daemon call returned only after the transaction holding it committed
    (the order the calls return in is trio's: the answers' order is read off the socket)."""
    committing: list[str] = []
    durable: set[str] = set()
    for entry in log:
        if entry.startswith("commit "):
            committing = entry.removeprefix("commit ").strip("[]").split(", ")
        elif entry.startswith("committed "):
            durable.update(committing)
        elif entry.startswith("answered "):
            bodies = entry.removeprefix("answered ").strip("[]").split(", ")
            assert durable.issuperset(bodies), (entry, log)


async def test_a_run_of_pipelined_batches_commits_and_answers_in_request_order(
        served: tuple[Control, Path]) -> None:
    control, path = served
    control.release.set()
    batches = [lines(*(f"{n}.{i}" for i in range(n % 3 + 1))) for n in range(12)]
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(b"".join(post("/v1/batch?stream=s", body) for body in batches))
        buffer = bytearray()
        answers = [json.loads((await read_answer(stream, buffer))[1]) for _ in batches]
    sizes = [n % 3 + 1 for n in range(12)]
    starts = [1 + sum(sizes[:n]) for n in range(12)]
    assert seqs(answers) == [list(range(s, s + k)) for s, k in zip(starts, sizes, strict=True)]
    submitted = [entry for entry in control.log if entry.startswith("submit")]
    assert submitted == [f"submit {[f'{n}.{i}'.encode() for i in range(n % 3 + 1)]}" for n in range(12)]
    answered_after_commit(control.log)
