"""A real PostgreSQL server for the tests: initdb into a temporary directory, a unix socket
there (no TCP port at all), stopped and removed at the end.

PostgreSQL refuses to run as root, so as root (CI) the server runs as `nobody`, in a
directory that user owns. Each test gets a database of its own (CREATE DATABASE from the
empty template), so tests never see each other's rows.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUPERUSER = "postgres"
START_TIMEOUT_S = 60


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: nothing is imported after fork
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGQUIT (PostgreSQL's immediate shutdown) when the test
    process dies, however it dies."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGQUIT)


def find_binaries() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None. Debian keeps them in
    /usr/lib/postgresql/VERSION/bin, off PATH."""
    on_path = shutil.which("initdb")
    if on_path is not None and shutil.which("pg_ctl") is not None:
        return Path(on_path).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


class PostgresServer:
    """One running server; dsn(name) addresses a database on it."""

    def __init__(self, binaries: Path, root: Path, user: str | None) -> None:
        self.binaries = binaries
        self.root = root
        self.data = root / "data"
        self.socket_dir = root
        self.user = user  # run the server as this user (None: as ourselves)
        self._names = itertools.count(1)

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            [str(self.binaries / argv[0]), *argv[1:]], user=self.user, cwd=self.root,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}):\n{result.stdout}\n"
                               f"{result.stderr}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
                  "-E", "UTF8", "--no-sync")
        # No TCP listener: the unix socket in our own directory only. fsync stays on: the
        # relay's durability contract is tested against a real commit. The server is our
        # child and dies with us (PR_SET_PDEATHSIG), even if pytest itself is killed.
        with (self.root / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binaries / "postgres"), "-D", str(self.data),
                 "-c", "listen_addresses=", "-c", f"unix_socket_directories={self.socket_dir}",
                 "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
                user=self.user, cwd=self.root, stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            ready = subprocess.run(
                [str(self.binaries / "pg_isready"), "-q", "-h", str(self.socket_dir),
                 "-U", SUPERUSER], stdin=subprocess.DEVNULL, check=False)
            if ready.returncode == 0:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{self.log()}")
            time.sleep(0.05)  # bounded: another process, no event to wait on

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGQUIT)  # immediate shutdown
                self.process.wait(timeout=30)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql:///{database}?host={self.socket_dir}&user={SUPERUSER}"

    def new_database(self) -> str:
        """A fresh empty database; its DSN."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text() if path.exists() else ""


def unavailable_reason() -> str | None:
    if find_binaries() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return "psycopg and psycopg_pool are not installed: pip install -e '.[postgres]'"
    return None


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    binaries = find_binaries()
    assert binaries is not None
    as_root = os.geteuid() == 0
    # Not under pytest's tmp_path: as root that is a 0700 directory `nobody` cannot enter.
    root = Path(tempfile.mkdtemp(prefix="meshd-pg-"))
    if as_root:
        shutil.chown(root, "nobody", "nogroup")
    server = PostgresServer(binaries, root, "nobody" if as_root else None)
    try:
        server.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield server
    finally:
        server.stop()
