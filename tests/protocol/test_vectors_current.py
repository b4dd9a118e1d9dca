"""The published vectors (protocol/vectors/*.json) are exactly what the code produces now.

A change to any construction changes its vector file in the same commit, or this fails: run
`PYTHONPATH=. python protocol/vectors/generate.py` and review the diff (the independent
checker in tests/interop/ then says whether the new bytes still follow the spec).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("meshd_vector_generator", VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    generator = _generator()
    return {name: generator.render(doc) for name, doc in generator.build().items()}


def test_every_checked_in_vector_file_is_generated(generated: dict[str, str]) -> None:
    assert sorted(p.name for p in VECTORS.glob("*.json")) == sorted(generated)


@pytest.mark.parametrize("name", sorted(p.name for p in VECTORS.glob("*.json")))
def test_the_checked_in_vectors_equal_what_the_code_produces(generated: dict[str, str], name: str) -> None:
    assert (VECTORS / name).read_text() == generated[name], (
        f"{name} is stale: run PYTHONPATH=. python protocol/vectors/generate.py")


def test_generation_is_deterministic(generated: dict[str, str]) -> None:
    again = _generator()
    assert {name: again.render(doc) for name, doc in again.build().items()} == generated
