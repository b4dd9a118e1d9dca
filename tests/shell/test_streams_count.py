"""GET /v1/streams counts every live record of every stream (O(records)): the count runs in
a worker thread on a connection of its own, never on the trio thread (issue 20)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from meshd.streamservice import StreamService

from .test_logsync import service


def test_streams_on_a_connection_of_its_own_from_any_thread(tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    logs.write_nowait("a", "1", b"x")
    logs.write_nowait("a", "2", b"y")
    logs.write_nowait("b", "1", b"z")
    found: list[Any] = []
    worker = threading.Thread(target=lambda: found.append(logs.store.streams_apart()))
    worker.start()
    worker.join()
    assert found == [logs.store.streams()] == [[("a", 2), ("b", 1)]]
    logs.store.close()


async def test_a_slow_count_leaves_the_trio_thread_serving(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    logs = service(tmp_path, 1)
    await logs.write("notes", "a", b"hello")
    progressed = threading.Event()
    counted_after_progress: list[bool] = []
    count = logs.streams

    def slow_count() -> list[dict[str, Any]]:
        # Answers once a trio task ran meanwhile (the timeout only ends a run of code that
        # counts on the trio thread: the assertion below then fails).
        counted_after_progress.append(progressed.wait(timeout=10))
        return count()

    monkeypatch.setattr(logs, "streams", slow_count)
    streams = StreamService(SimpleNamespace(logs=logs))  # type: ignore[arg-type]
    answers: list[Any] = []

    async def ask() -> None:
        answers.append(await streams.streams())

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()  # the count waits in its thread
            progressed.set()
    finally:
        progressed.set()
    assert counted_after_progress == [True]
    assert answers == [[{"stream": "notes", "records": 1}]]
    logs.store.close()
