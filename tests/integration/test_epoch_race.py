"""Concurrent epoch changes with real daemons and a real relay process (protocol/circle.md,
"An epoch is the record that made it"). The scenario is in epochrace.py: alpha removes the
thief while beta, cut off from it, pairs a phone; both records carry one epoch number, the
pairing's (sealed to the thief) with the higher hash.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .epochrace import run_race

pytestmark = pytest.mark.slow


async def test_a_removal_and_a_concurrent_pairing_settle_on_one_epoch(tmp_path: Path) -> None:
    out = await run_race(tmp_path)
    assert out.settled, "the members did not settle on one circle and one current epoch record"
    assert not out.current_sealed_to_thief, "the current epoch is sealed to the removed thief"
    assert out.thief_psk_taken_by == [], (
        f"{out.thief_psk_taken_by} took the thief's key for epoch {out.race_number}")
    assert out.number_means_removal == dict.fromkeys(("alpha", "beta", "phone"), True)
    assert out.lost == dict.fromkeys(("alpha", "beta", "phone"), []), "acknowledged writes lost"
    assert not out.thief_member
    assert not out.thief_read_after, "the thief read what was written after the race"
