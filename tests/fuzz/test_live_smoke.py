"""A bounded smoke of the live fuzzers (make fuzz runs 100,000 inputs per target)."""

from __future__ import annotations

import os

import pytest

from .live import LIVE, run

pytestmark = pytest.mark.slow

SMOKE_INPUTS = int(os.environ.get("MESHD_LIVE_FUZZ_SMOKE_INPUTS", "1500"))
SMOKE_LIMIT_S = 15.0


@pytest.mark.parametrize("name", sorted(LIVE))
async def test_live_fuzz_smoke_finds_no_bug(name: str) -> None:
    result = (await run([name], SMOKE_INPUTS, seed=7, limit_s=SMOKE_LIMIT_S))[name]
    assert result["inputs"] > 0
    assert not result["bugs"], "\n\n".join(result["bugs"][:3])


async def test_the_daemon_fuzz_reaches_the_code_behind_the_member_handshake() -> None:
    """Most daemon inputs are frames a paired member sends after a completed handshake (the
    device port's Noise_XXpsk0): not handshakes the daemon refuses at its first message."""
    result = (await run(["daemon"], 300, seed=7, limit_s=SMOKE_LIMIT_S))["daemon"]
    assert result.get("behind_handshake", 0) > result["inputs"] // 2, result
