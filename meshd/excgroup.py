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
