"""relay.segment_list reads a key's own rows, not the whole circle (review s6, item 3).

One page of segments_of for a key with few segments cost a scan of every row of the circle
(SQLite: SEARCH segments (circle_id=? AND id>?)), so one member key listing could keep a relay
busy. The segments are indexed by (circle_id, device, id) (SQLite: on open; PostgreSQL:
migration 6), and a page reads the key's rows and the rows stored before owners were recorded
(b"") by that index, each bounded by the page size, and merges them in id order.
"""

from __future__ import annotations

from pathlib import Path

from meshd.relay.postgres_schema import SEGMENTS_OF
from meshd.relay.storage import SQLiteRelayStorage

from .test_relay import (  # noqa: F401 - the hook and fixture run each test on both backends
    open_storage,
    pytest_generate_tests,
    relay_backend,
)

CIRCLE = b"c" * 32
ALICE = b"a" * 32
BOB = b"b" * 32
BOBS = [b"B%015d" % i for i in (1, 500, 900)]  # interleaved with alice's and the old ones
OLD = [b"B%015d" % i for i in (3, 700)]  # stored before owners were recorded (b"")


def fill(storage: object, alices: int) -> None:
    """The circle: bob's few segments, two from before owners, `alices` of alice's."""
    rows = [(CIRCLE, b"B%015d" % i, b"x", ALICE) for i in range(alices) if b"B%015d" % i
            not in BOBS + OLD]
    rows += [(CIRCLE, i, b"bob", BOB) for i in BOBS] + [(CIRCLE, i, b"old", b"") for i in OLD]
    rows += [(b"d" * 32, b"B%015d" % i, b"y", BOB) for i in range(5)]  # another circle
    sql = "INSERT INTO segments (circle_id, id, blob, device) VALUES ({0}, {0}, {0}, {0})"
    if isinstance(storage, SQLiteRelayStorage):
        db = storage._writer  # noqa: SLF001 - one transaction, not one fsync per row
        db.execute("BEGIN")
        db.executemany(sql.format("?"), rows)
        db.execute("COMMIT")
        return
    with storage._pool.connection() as pg:  # type: ignore[attr-defined]  # noqa: SLF001
        with pg.cursor() as cursor:
            cursor.executemany(sql.format("%s"), rows)
        pg.execute("ANALYZE segments")


def pages(storage: object, device: bytes, limit: int) -> list[list[bytes]]:
    """Every page of the listing, as segment_list walks it."""
    result: list[list[bytes]] = []
    after = b""
    while True:
        page = [i for i, _ in storage.segments_of(CIRCLE, device, after, limit)]  # type: ignore[attr-defined]
        if not page:
            return result
        result.append(page)
        after = page[-1]


def test_the_pages_of_a_key_are_its_rows_and_the_old_ones_in_order(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "relay")
    try:
        fill(storage, 1000)
        mine = sorted(BOBS + OLD)
        assert pages(storage, BOB, 100) == [mine]
        assert pages(storage, BOB, 2) == [mine[0:2], mine[2:4], mine[4:5]]
        assert pages(storage, BOB, 1) == [[i] for i in mine]
        sizes = dict(storage.segments_of(CIRCLE, BOB, b"", 100))
        assert sizes == {**{i: 3 for i in BOBS + OLD}}
        alices = [i for page in pages(storage, ALICE, 300) for i in page]
        assert len(alices) == 1000 - len(BOBS) and alices == sorted(alices)
        assert set(OLD) <= set(alices) and not set(BOBS) & set(alices)
        assert pages(storage, b"", 10) == [sorted(OLD)]  # the old rows once, not twice
    finally:
        storage.close()


def sqlite_steps(storage: SQLiteRelayStorage) -> tuple[list[bytes], int]:
    """Bob's first page, and the SQLite VM instructions it took (a progress handler called
    at every one)."""
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    storage._reader.set_progress_handler(step, 1)  # noqa: SLF001
    page = [i for i, _ in storage.segments_of(CIRCLE, BOB, b"", 10)]
    storage._reader.set_progress_handler(None, 1)  # noqa: SLF001
    return page, steps


def postgres_rows_read(storage: object) -> int:
    """The rows PostgreSQL's plan of Bob's first page read (returned or filtered out)."""
    params = {"circle": CIRCLE, "device": BOB, "after": b"", "limit": 10}
    with storage._pool.connection() as db:  # type: ignore[attr-defined]  # noqa: SLF001
        ((plan,),) = db.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + SEGMENTS_OF, params).fetchall()
    total = 0
    nodes = [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if "Relation Name" in node:  # a scan of the table or of an index
            total += node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
    return total


def test_a_page_does_not_read_the_other_keys_rows(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "relay")
    try:
        fill(storage, 20_000)
        if isinstance(storage, SQLiteRelayStorage):
            page, many = sqlite_steps(storage)
            assert page == sorted(BOBS + OLD)
            few_storage = SQLiteRelayStorage(tmp_path / "few.sqlite3")
            try:
                fill(few_storage, 20)
                few_page, few = sqlite_steps(few_storage)
            finally:
                few_storage.close()
            assert few_page == page
            # The same work whatever alice stored (a scan of the circle: 140,000 steps here).
            assert many == few
        else:
            # Bob's 3 and the 2 old ones (a scan of the circle: 20,000 rows here).
            assert postgres_rows_read(storage) <= 2 * len(BOBS + OLD)
    finally:
        storage.close()


def drop_the_index(storage: object) -> None:
    """Make the storage as the version before segments_by_device left it."""
    if isinstance(storage, SQLiteRelayStorage):
        storage._writer.execute("DROP INDEX segments_by_device")  # noqa: SLF001
        return
    with storage._pool.connection() as db:  # type: ignore[attr-defined]  # noqa: SLF001
        db.execute("DROP INDEX segments_by_device")
        db.execute("UPDATE relay_schema SET version = 5")


def indexes(storage: object) -> set[str]:
    if isinstance(storage, SQLiteRelayStorage):
        return {row[1] for row in storage._reader.execute("PRAGMA index_list(segments)")}  # noqa: SLF001
    with storage._pool.connection() as db:  # type: ignore[attr-defined]  # noqa: SLF001
        rows = db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'segments'")
        return {row[0] for row in rows}


def test_the_index_is_added_to_a_storage_made_before_it(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "relay")
    drop_the_index(storage)
    assert "segments_by_device" not in indexes(storage)
    storage.close()
    storage = open_storage(tmp_path / "relay")  # the upgrade (PostgreSQL: migration 6)
    try:
        assert "segments_by_device" in indexes(storage)
        fill(storage, 100)
        assert pages(storage, BOB, 2) == [sorted(BOBS + OLD)[i:i + 2] for i in (0, 2, 4)]
    finally:
        storage.close()
