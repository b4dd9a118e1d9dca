"""StreamService.write_puts: the batch route's usual request (puts with fresh ids to one
stream) checked once per batch, committed as one unit with one Python object per record
built off the trio thread; None (the route then answers record by record) when a
per-batch check fails, with nothing submitted."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

from meshd import streamservice
from meshd.api.metrics import MeshdMetrics
from meshd.net.logsync import CheckedWrite
from meshd.protocol.entry import MAX_BODY_BYTES
from meshd.protocol.log import PUT, Write
from meshd.streamservice import StreamService


class Logs:
    def __init__(self) -> None:
        self.units: list[Sequence[Write]] = []

    async def submit_ids(self, writes: Sequence[Write]) -> list[tuple[str, int]]:
        self.units.append(writes)
        return [(f"id{i}", 10 + i) for i in range(len(writes))]


class Host:
    def __init__(self) -> None:
        self.logs = Logs()
        self.metrics = MeshdMetrics()

    def require_member(self) -> None:
        pass

    def count_error(self, kind: str) -> None:
        raise AssertionError(kind)


async def test_puts_are_one_unit_of_checked_writes_with_fresh_ids() -> None:
    host = Host()
    written = await StreamService(host).write_puts("s", [b"a", b"", b"c"])  # type: ignore[arg-type]
    assert written == [("id0", 10), ("id1", 11), ("id2", 12)]
    [unit] = host.logs.units
    assert list(unit) == [CheckedWrite("s", "", PUT, b) for b in (b"a", b"", b"c")]
    assert all(type(w) is CheckedWrite for w in unit)


@pytest.mark.parametrize(("stream", "bodies"), [
    ("", [b"a"]),                                   # no stream name
    ("x" * 300, [b"a"]),                            # a name the log cannot hold
    ("s", [b"a", b"x" * (MAX_BODY_BYTES + 1)]),     # one body too large
    ("s", [b"a", "text"]),                          # one body not bytes
    ("s", []),
])
async def test_a_batch_failing_a_check_is_left_to_write_batch(stream: str, bodies: list[bytes]) -> None:
    host = Host()
    assert await StreamService(host).write_puts(stream, bodies) is None  # type: ignore[arg-type]
    assert host.logs.units == []


async def test_a_large_batch_builds_its_writes_off_the_trio_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real = streamservice._put_writes

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return real(*args)
    monkeypatch.setattr(streamservice, "_put_writes", spy)
    host = Host()
    await StreamService(host).write_puts("s", [b"x"] * streamservice.THREAD_WRITES)  # type: ignore[arg-type]
    await StreamService(host).write_puts("s", [b"x"])  # type: ignore[arg-type]
    assert threads[0] is not threading.main_thread() and threads[1] is threading.main_thread()
    assert [len(unit) for unit in host.logs.units] == [streamservice.THREAD_WRITES, 1]
