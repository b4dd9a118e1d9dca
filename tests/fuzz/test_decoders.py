"""A bounded smoke of the decoder fuzzers, and the replay of every saved finding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .mutate import REGRESSIONS, fuzz
from .targets import TARGETS, check

SMOKE_INPUTS = int(os.environ.get("MESHD_FUZZ_SMOKE_INPUTS", "2000"))
HYPOTHESIS_EXAMPLES = int(os.environ.get("MESHD_FUZZ_EXAMPLES", "100"))

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=80),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), children, max_size=6),
    max_leaves=40,
)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutated_seeds_raise_only_remote_protocol_errors(name: str) -> None:
    findings = fuzz(TARGETS[name], SMOKE_INPUTS, seed=len(name), stop_after_s=3.0)
    assert not findings, f"saved to {findings}"


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(value=msgpack_values)
def test_arbitrary_msgpack_raises_only_remote_protocol_errors(name: str, value: object) -> None:
    target = TARGETS[name]
    if target.takes == "bytes":
        check(target, msgpack.packb(value, use_bin_type=True))
    else:
        check(target, value)


def regressions() -> list[Path]:
    return sorted(REGRESSIONS.glob("*.json"))


@pytest.mark.parametrize("path", regressions(), ids=lambda p: p.stem)
def test_saved_findings_stay_fixed(path: Path) -> None:
    saved = json.loads(path.read_text())
    data = bytes.fromhex(saved["hex"])
    target = TARGETS[saved["target"]]
    check(target, data if target.takes == "bytes" else msgpack.unpackb(data, raw=False, strict_map_key=False))
