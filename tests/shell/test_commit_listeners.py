"""A commit listener that raises (a bug) neither stops the daemon nor the other listeners.

CommitSignal.fire() ran its listeners in a plain loop. A listener that raised ended fire()
there: the listeners after it were skipped and the waiters of that commit were not woken
(the Event was never set). Where the commit came from decided the rest: a local write's
group commit answers its units in a run_sync_soon callback (GroupCommit._answer), and an
exception out of such a callback is a TrioInternalError: the whole daemon's run crashed,
with every unit of the group left unanswered.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

import meshd.net.commitsignal as commitsignal
from meshd.net.commitsignal import CommitSignal


def reported_bugs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, BaseException]]:
    reported: list[tuple[str, BaseException]] = []
    monkeypatch.setattr(commitsignal, "report_bug", lambda where, err: reported.append((where, err)),
                        raising=False)  # (main has none: the test fails on what it checks)
    return reported


async def test_a_raising_listener_skips_no_other_and_wakes_the_waiters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reported = reported_bugs(monkeypatch)
    signal = CommitSignal()
    heard: list[str] = []
    bug = ValueError("a bug in a listener")

    def raising() -> None:
        heard.append("raising")
        raise bug

    signal.listen(raising)
    signal.listen(lambda: heard.append("after"))
    woken: list[int] = []

    async def waiter() -> None:
        woken.append(await signal.wait(0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        signal.fire()  # on main: raised ValueError here
    assert heard == ["raising", "after"]
    assert woken == [1]
    assert reported == [("commit-listener", bug)]
    signal.fire()  # the listener stays: a bug is reported each time, not unlistened
    assert heard == ["raising", "after"] * 2


# In a process of its own: on main the run hangs for good (the write's unit waits on an
# answer that never comes, in a wait that refuses cancellation, while trio tries to crash).
LOCAL_WRITE = """
import sys, time, trio
from pathlib import Path
import meshd.net.commitsignal as commitsignal
from meshd.net.logsync import LogService
from meshd.store.db import Store
from tests.protocol.test_log import signer

reported = []
commitsignal.report_bug = lambda where, err: reported.append(where)

async def main():
    store = Store(Path(sys.argv[1]) / "meshd.db")
    logs = LogService(store, signer(1), lambda: int(time.time() * 1000))
    def raising():
        raise RuntimeError("a bug in a listener")
    logs.changed.listen(raising)
    try:
        written = await logs.write("notes", "a", b"body")
    finally:
        store.close()
    print(written["seq"], logs.changed.generation, reported)

trio.run(main)
"""


def test_a_raising_listener_does_not_crash_a_local_writes_group_commit(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run([sys.executable, "-c", LOCAL_WRITE, str(tmp_path)], cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                              text=True, timeout=60)  # a guard against the hang, not a measure
    except subprocess.TimeoutExpired:
        pytest.fail("the local write never returned: its group commit's answer crashed")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == "1 1 ['commit-listener']"


GROUP_COMMIT = """
import trio
from meshd.store.groupcommit import GroupCommit

def committed(value):
    raise RuntimeError("a bug in the commit callback")

async def main():
    group = GroupCommit(lambda writes: len(writes), committed)
    await group.submit(["w"])

try:
    trio.run(main)
except trio.TrioInternalError as err:
    print("crashed:", repr(err.__cause__ or err.__context__))
"""


def test_a_raising_commit_callback_still_answers_its_units(tmp_path: Path) -> None:
    """The class behind the listener's hang: GroupCommit._answer called `committed` before it
    answered the group's units, which wait in a wait that refuses cancellation. A callback
    that raised left them waiting while trio crashed: the process hung for good. Now every
    unit is answered first and the bug crashes the run (as an error in trio's own callbacks
    does) instead of hanging it."""
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run([sys.executable, "-c", GROUP_COMMIT], cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                              text=True, timeout=60)  # a guard against the hang, not a measure
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung: the group's unit was never answered")
    assert done.stdout.startswith("crashed: "), done.stderr[-2000:]
    assert "RuntimeError('a bug in the commit callback')" in done.stdout
