"""Shared fixtures and paths for the whole suite."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .postgres import PostgresServer, postgres_server, unavailable_reason

REPO = Path(__file__).resolve().parent.parent
SHARED_VECTORS = REPO.parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def shared_vectors() -> Path:
    """../shared/vectors beside the repository; the public test vectors live there."""
    if not SHARED_VECTORS.is_dir():
        pytest.fail(f"public test vectors not found at {SHARED_VECTORS}")
    return SHARED_VECTORS


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (tests/postgres.py); skips with the reason
    when the binaries or the driver are missing."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with postgres_server() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres: PostgresServer) -> str:
    """The DSN of a fresh, empty database of its own on that server."""
    return postgres.new_database()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for unix sockets: sun_path holds only 107 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="meshd-", dir="/tmp"))
    directory.chmod(0o755)  # so a client running as another uid can reach the socket
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
