"""What a trio nursery raised, unwrapped: used by the entry points, log sync, peers and the
relay alike, so it lives on its own rather than in transport.py."""

from __future__ import annotations

import trio


def first_leaf(error: BaseException) -> BaseException:
    """The first real error inside nested exception groups (a trio nursery wraps what its
    tasks raise), passing over Cancelled; anything that is not a group is returned as is."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    for inner in error.exceptions:
        leaf = first_leaf(inner)
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return error


def stopping_and_bugs(group: BaseExceptionGroup, expected: tuple[type[BaseException], ...]
                      ) -> tuple[BaseExceptionGroup | None, ExceptionGroup | None]:
    """A nursery's group split into what stops the task (Cancelled, KeyboardInterrupt: to be
    raised alone, so that no error raised in the same instant rides out with it) and the
    bugs among the rest (the errors that are not of the expected types)."""
    errors, stopping = group.split(Exception)
    bugs = None
    if errors is not None:
        _, bugs = errors.split(expected)
    assert bugs is None or isinstance(bugs, ExceptionGroup)
    return stopping, bugs
