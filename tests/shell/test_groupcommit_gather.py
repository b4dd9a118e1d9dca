"""Group commit gathering (meshd/store/groupcommit.py): how many units a group waits for.

A fake commit stands in for the store, so what is counted is the policy alone: which units
share a transaction. The gather bound is given to the GroupCommit (a callable), so these
tests never depend on how fast the machine is: HOLD_LIMIT_S only stops a hang.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from meshd.store.groupcommit import MAX_GATHER_S, GroupCommit, default_gather_s

HOLD_LIMIT_S = 10.0  # only a guard against a hang: the tests wait on events, never on time
WRITERS = 16
ROUNDS = 5


def recording() -> tuple[GroupCommit[int], list[list[object]]]:
    groups: list[list[object]] = []

    def commit(writes: Sequence[object]) -> int:
        groups.append(list(writes))
        return len(groups)

    return GroupCommit(commit, lambda _value: None,  # type: ignore[arg-type]
                       gather_s=lambda _last_commit_s: HOLD_LIMIT_S, linger_s=HOLD_LIMIT_S), groups


async def test_closed_loop_writers_whose_next_writes_arrive_one_by_one_share_one_group_per_round(
) -> None:
    """Sixteen apps each send a write, wait for its answer, and send the next: as through the
    API, where the trio thread answers and reads the sixteen one after another. A write that
    comes back first must not take a transaction of its own (and make the other fifteen wait
    for its fsync): the group waits for the writers that were in the last one."""
    group_commit, groups = recording()

    async def writer(i: int) -> None:
        for r in range(ROUNDS):
            await group_commit.submit([(i, r)])  # type: ignore[list-item]
            for _ in range(i):  # writer i's next request is read i scheduler passes later
                await trio.lowlevel.checkpoint()

    with trio.fail_after(HOLD_LIMIT_S * 2):
        async with trio.open_nursery() as nursery:
            for i in range(WRITERS):
                nursery.start_soon(writer, i)
    assert [len(group) for group in groups] == [WRITERS] * ROUNDS
    for r, group in enumerate(groups):
        assert sorted(group) == [(i, r) for i in range(WRITERS)]  # type: ignore[type-var]


async def test_a_lone_writer_never_waits_for_company() -> None:
    """One writer at a time: every group is complete as soon as its one unit is queued (if
    the policy waited for a second unit, each write would take the whole bound)."""
    group_commit, groups = recording()
    with trio.fail_after(HOLD_LIMIT_S / 2):
        for r in range(20):
            await group_commit.submit([r])  # type: ignore[list-item]
    assert groups == [[r] for r in range(20)]


async def test_the_wait_for_writers_that_do_not_come_back_is_bounded() -> None:
    """Sixteen writers, then only one: the lone write waits at most the bound, then commits."""
    groups: list[list[object]] = []
    bounds: list[float] = []

    def commit(writes: Sequence[object]) -> int:
        groups.append(list(writes))
        return len(groups)

    def gather_s(last_commit_s: float) -> float:
        bounds.append(last_commit_s)
        return 0.01

    group_commit: GroupCommit[int] = GroupCommit(commit, lambda _value: None,  # type: ignore[arg-type]
                                                 gather_s=gather_s)
    async with trio.open_nursery() as nursery:
        for i in range(WRITERS):
            nursery.start_soon(group_commit.submit, [i])
    with trio.fail_after(HOLD_LIMIT_S):
        await group_commit.submit(["alone"])  # type: ignore[list-item]
    assert [len(group) for group in groups] == [WRITERS, 1]
    assert bounds and all(last >= 0 for last in bounds)  # the bound was asked, given the commit time


async def test_a_full_group_does_not_wait_for_company() -> None:
    """A unit as large as a group (a batch request) leaves at once, however many writers the
    last groups held: more units could not join it anyway."""
    groups: list[list[object]] = []

    def commit(writes: Sequence[object]) -> int:
        groups.append(list(writes))
        return len(groups)

    group_commit: GroupCommit[int] = GroupCommit(commit, lambda _value: None,  # type: ignore[arg-type]
                                                 max_group_entries=WRITERS,
                                                 gather_s=lambda _last_commit_s: HOLD_LIMIT_S)
    async with trio.open_nursery() as nursery:
        for i in range(WRITERS):
            nursery.start_soon(group_commit.submit, [i])
    with trio.fail_after(HOLD_LIMIT_S / 2):  # waiting for company would take HOLD_LIMIT_S
        await group_commit.submit(list(range(WRITERS)))  # type: ignore[arg-type]
    assert [len(group) for group in groups] == [WRITERS, WRITERS]


def test_the_default_bound_is_the_last_commit_time_capped() -> None:
    """Waiting for company costs a write at most about one commit (capped): never more than
    what the units would have waited behind a transaction of their own."""
    assert default_gather_s(MAX_GATHER_S / 4) == MAX_GATHER_S / 4
    assert default_gather_s(MAX_GATHER_S * 10) == MAX_GATHER_S
    assert default_gather_s(0.0) == 0.0


async def test_a_writer_that_comes_back_finds_the_writer_thread_still_running() -> None:
    """The writer thread lingers for the next unit instead of stopping when the queue is
    empty: a busy writer does not pay for a thread start per group."""
    group_commit, groups = recording()
    for r in range(20):
        await group_commit.submit([r])  # type: ignore[list-item]
    assert len(groups) == 20 and group_commit.threads == 1
