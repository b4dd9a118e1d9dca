"""A partition of a minute with both sides writing, then a heal: the connection is declared
dead during the partition (not left "connected" in a zero window), and both sides converge
once the link is back. Two real daemons on two namespace hosts; needs root."""

from __future__ import annotations

from pathlib import Path

import pytest

from .netns import available
from .partition import partition

OK, WHY_NOT = available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not OK, reason=WHY_NOT)]

DEAD_WITHIN_S = 45.0  # peers.md: reported gone within 45 s of the cut (40 s + margin), buffers full or not
HEAL_S = 10.0  # the bound on convergence after the heal


@pytest.mark.slow
async def test_a_minute_long_partition_with_both_sides_writing_heals(tmp_path: Path) -> None:
    outcome = await partition(tmp_path, 60.0, "link", heal_limit_s=3 * HEAL_S)
    print(outcome.line())
    assert set(outcome.down_after) == {"left", "right"}, f"still reported connected: {outcome.line()}"
    assert max(outcome.down_after.values()) <= DEAD_WITHIN_S, outcome.line()
    assert outcome.lost == 0 and outcome.converge_s <= HEAL_S, outcome.line()
