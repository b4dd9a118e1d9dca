"""The PostgreSQL harness itself: a real server, one database per test, nothing shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..postgres import PostgresServer

psycopg = pytest.importorskip("psycopg")


def test_each_test_gets_an_empty_database_on_a_real_server(
    postgres: PostgresServer, postgres_dsn: str
) -> None:
    with psycopg.connect(postgres_dsn) as connection:
        version = connection.execute("SHOW server_version_num").fetchone()
        assert version is not None and int(version[0]) >= 120000
        tables = connection.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables == (0,)
        # Reached through a unix socket in the server's own directory: no TCP port at all.
        assert connection.info.host == str(postgres.socket_dir)
        assert connection.execute("SHOW listen_addresses").fetchone() == ("",)
    assert Path(postgres.socket_dir).stat().st_uid == (65534 if os.geteuid() == 0 else os.geteuid())
