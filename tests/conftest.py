"""Shared fixtures and paths for the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_VECTORS = REPO.parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def shared_vectors() -> Path:
    """../shared/vectors beside the repository; the public test vectors live there."""
    if not SHARED_VECTORS.is_dir():
        pytest.fail(f"public test vectors not found at {SHARED_VECTORS}")
    return SHARED_VECTORS
