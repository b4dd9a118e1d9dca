"""The backup's batching window (meshd/protocol/backupwindow.py): when an upload starts."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from meshd.protocol.backupwindow import (
    MANIFEST_SHARE,
    SETTLE_S,
    WINDOW_BYTES,
    WINDOW_S,
    BackupWindow,
)


def bytes_of(n: int) -> Callable[[int], int]:
    return lambda _enough: n


def run(window: BackupWindow, writes: list[tuple[float, int]]) -> list[float]:
    """Drive the window as the shell does: each write (at time t, of n bytes) is a change
    and a look at the window; between them the shell sleeps what due_in() says. An upload
    takes no time and backs up every byte written before it. Returns the upload times."""
    uploads: list[float] = []
    pending = 0
    queue = sorted(writes)
    now = 0.0
    while True:
        due = window.due_in(now, bytes_of(pending))
        if due == 0:
            uploads.append(now)
            window.started()
            pending = 0
            continue
        wake = now + due if due is not None else math.inf
        if queue and queue[0][0] <= wake:
            now, size = queue.pop(0)
            pending += size
            window.changed(now)
        elif wake == math.inf:
            return uploads
        else:
            now = wake


def test_a_burst_of_small_writes_is_one_upload() -> None:
    window = BackupWindow()
    writes = [(i * 0.5, 300) for i in range(20)]  # 20 writes of 300 B over 10 s: 6,000 B
    assert run(window, writes) == [WINDOW_S]


def test_a_single_small_write_is_uploaded_within_the_window() -> None:
    window = BackupWindow()
    assert run(window, [(3.0, 100)]) == [3.0 + WINDOW_S]


def test_a_large_write_goes_after_the_settle_time_only() -> None:
    window = BackupWindow()
    assert run(window, [(1.0, WINDOW_BYTES)]) == [1.0 + SETTLE_S]


def test_small_writes_that_add_up_to_the_size_go_once_they_do() -> None:
    window = BackupWindow()
    step = WINDOW_BYTES // 4
    writes = [(float(i), step) for i in range(10)]  # the 4th write, at 3 s, reaches the size
    uploads = run(window, writes)
    assert uploads[0] == 3.0
    assert len(uploads) == 3  # 3.0 (4 writes), 7.0 (4 more), and the last 2 at 8 + WINDOW_S
    assert uploads[1] == 7.0 and uploads[2] == 8.0 + WINDOW_S


def test_a_prompt_change_waits_only_the_settle_time() -> None:
    window = BackupWindow()
    window.changed(10.0)
    assert window.due_in(10.0, bytes_of(0)) == WINDOW_S
    window.changed(12.0, prompt=True)  # e.g. a circle record
    assert window.due_in(12.0, bytes_of(0)) == 0.0  # the oldest change is already 2 s old
    window.started()
    window.changed(13.0, prompt=True)
    assert window.due_in(13.5, bytes_of(0)) == pytest.approx(SETTLE_S - 0.5)


def test_nothing_changed_nothing_waits_and_the_size_is_asked_only_when_it_decides() -> None:
    window = BackupWindow()

    def never(_enough: int) -> int:
        raise AssertionError("pending bytes asked for although nothing changed")

    assert window.due_in(5.0, never) is None
    window.changed(5.0, prompt=True)
    assert window.due_in(6.0, never) == pytest.approx(1.0)
    window.started()
    window.changed(7.0)
    assert window.due_in(7.0 + WINDOW_S, never) == 0.0  # old enough: no need to count


def test_a_window_shorter_than_the_settle_time_wins_and_zero_uploads_at_once() -> None:
    assert run(BackupWindow(1.0), [(0.0, 10)]) == [1.0]
    assert run(BackupWindow(0.0), [(0.0, 10)]) == [0.0]
    with pytest.raises(ValueError):
        BackupWindow(-1.0)


def test_the_size_worth_an_upload_grows_with_the_manifest() -> None:
    """A 20 KB manifest (a large log's) is not stored for every 16 KiB of entries: the size
    that goes before the window's time is MANIFEST_SHARE times the manifest."""
    manifest = 20_000
    window = BackupWindow()
    window.changed(0.0)
    asked: list[int] = []

    def pending(enough: int) -> int:
        asked.append(enough)
        return WINDOW_BYTES

    assert window.due_in(3.0, pending, manifest) == WINDOW_S - 3.0  # 16 KiB: wait
    assert asked == [MANIFEST_SHARE * manifest]
    assert window.due_in(3.0, bytes_of(MANIFEST_SHARE * manifest), manifest) == 0.0
    assert window.due_in(3.0, bytes_of(WINDOW_BYTES), 1_000) == 0.0  # a small manifest: 16 KiB
