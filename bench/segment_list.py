"""One page of relay.segment_list for a key with few segments in a circle full of another
key's (review s6, item 3): main's query (a scan of the circle) beside segments_of's (the
key's rows and the old b"" rows by segments_by_device), on the same data, in the same run.

SQLite always; PostgreSQL with --postgres (a throwaway server, tests/postgres.py). Each round
times PAGES pages of each, alternating; prints ms per page (median of the rounds) and the
ratio main/new.

    python bench/segment_list.py [--rows 50000] [--rounds 5] [--postgres]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshd.relay.storage import SQLiteRelayStorage  # noqa: E402

CIRCLE = b"c" * 32
ALICE = b"a" * 32
BOB = b"b" * 32
PAGES = 20
LIMIT = 256  # the relay's page (protocol/relay.md, relay.segment_list)
BLOB = 1024

# main (28c22d3)'s statements, before the index.
MAIN_SQLITE = ("SELECT id, length(blob) FROM segments WHERE circle_id = ? AND id > ? "
               "AND (device = ? OR device = x'') ORDER BY id LIMIT ?")
MAIN_POSTGRES = ("SELECT id, octet_length(blob) FROM segments WHERE circle_id = %s AND id > %s "
                 "AND (device = %s OR device = ''::bytea) ORDER BY id LIMIT %s")


def rows(count: int) -> list[tuple[bytes, bytes, bytes, bytes]]:
    blob = os.urandom(BLOB)
    return [(CIRCLE, os.urandom(16), blob, ALICE) for _ in range(count)]


def per_page(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    for _ in range(PAGES):
        run()
    return (time.perf_counter() - start) / PAGES * 1000


def compare(name: str, main: Callable[[], object], new: Callable[[], object], rounds: int) -> None:
    mains, news = [], []
    for _ in range(rounds):
        mains.append(per_page(main))
        news.append(per_page(new))
    m, n = statistics.median(mains), statistics.median(news)
    print(f"{name}: main {m:.3f} ms/page (rounds {', '.join(f'{x:.2f}' for x in mains)}); "
          f"new {n:.4f} ms/page (rounds {', '.join(f'{x:.3f}' for x in news)}); "
          f"main/new {m / n:.0f}x")


def sqlite(count: int, rounds: int, directory: Path) -> None:
    data = rows(count)
    storages = {}
    for label in ("main", "new"):
        storage = SQLiteRelayStorage(directory / f"{label}.sqlite3")
        db = storage._writer  # noqa: SLF001
        db.execute("BEGIN")
        db.executemany("INSERT INTO segments (circle_id, id, blob, device) VALUES (?, ?, ?, ?)", data)
        db.execute("COMMIT")
        storages[label] = storage
    storages["main"]._writer.execute("DROP INDEX segments_by_device")  # noqa: SLF001 - main's schema
    reader = storages["main"]._reader  # noqa: SLF001
    plan = [row[3] for row in reader.execute("EXPLAIN QUERY PLAN " + MAIN_SQLITE, (CIRCLE, b"", BOB, LIMIT))]
    print(f"sqlite main plan: {plan}")
    new_plan = [row[3] for row in storages["new"]._reader.execute(  # noqa: SLF001
        "EXPLAIN QUERY PLAN " + __import__("meshd.relay.storage").relay.storage.SEGMENTS_OF,
        {"circle": CIRCLE, "device": BOB, "after": b"", "limit": LIMIT})]
    print(f"sqlite new plan: {new_plan}")
    assert reader.execute(MAIN_SQLITE, (CIRCLE, b"", BOB, LIMIT)).fetchall() == []
    assert storages["new"].segments_of(CIRCLE, BOB, b"", LIMIT) == []
    compare(f"sqlite, {count} rows of another key",
            lambda: reader.execute(MAIN_SQLITE, (CIRCLE, b"", BOB, LIMIT)).fetchall(),
            lambda: storages["new"].segments_of(CIRCLE, BOB, b"", LIMIT), rounds)
    for storage in storages.values():
        storage.close()


def postgres(count: int, rounds: int) -> None:
    from meshd.relay.postgres import open_postgres
    from tests.postgres import postgres_server, unavailable_reason

    if (reason := unavailable_reason()) is not None:
        print(f"postgresql: skipped ({reason})")
        return
    with postgres_server() as server:
        storage = open_postgres(server.new_database())
        try:
            with storage._pool.connection() as db:  # noqa: SLF001
                with db.cursor() as cursor:
                    cursor.executemany("INSERT INTO segments (circle_id, id, blob, device) "
                                       "VALUES (%s, %s, %s, %s)", rows(count))
                db.execute("ANALYZE segments")

            def main() -> object:
                with storage._pool.connection() as db:  # noqa: SLF001
                    # main's plan: no segments_by_device to use (hidden, not dropped)
                    db.execute("BEGIN")
                    db.execute("DROP INDEX segments_by_device")
                    found = db.execute(MAIN_POSTGRES, (CIRCLE, b"", BOB, LIMIT)).fetchall()
                    db.execute("ROLLBACK")
                    return found

            def drop_cost() -> object:  # the BEGIN/DROP/ROLLBACK alone, subtracted below
                with storage._pool.connection() as db:  # noqa: SLF001
                    db.execute("BEGIN")
                    db.execute("DROP INDEX segments_by_device")
                    db.execute("ROLLBACK")
                    return None

            assert main() == [] and storage.segments_of(CIRCLE, BOB, b"", LIMIT) == []
            compare(f"postgresql, {count} rows of another key (main incl. BEGIN/DROP INDEX/ROLLBACK)",
                    main, lambda: storage.segments_of(CIRCLE, BOB, b"", LIMIT), rounds)
            compare("postgresql, the BEGIN/DROP INDEX/ROLLBACK alone vs new", drop_cost,
                    lambda: storage.segments_of(CIRCLE, BOB, b"", LIMIT), rounds)
        finally:
            storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; {PAGES} pages of {LIMIT} per round, {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as directory:
        sqlite(args.rows, args.rounds, Path(directory))
    if args.postgres:
        postgres(args.rows, args.rounds)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
