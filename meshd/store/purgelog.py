"""Which entries the commits that purged bodies purged: a bounded journal, so the backup
checks only the segments covering them (issue 20).

A delete, an overwrite, a clear or a cut deletes rows of `bodies` (meshd/store/db.py). A TEMP
trigger on the write connection notes each deleted id in a TEMP table; at the end of the
transaction the store reads them back as runs of consecutive ids (one statement; an entry's
id is author_id << SEQ_BITS | seq, so a run is one author's seq range) and empties the table,
in the same transaction (a rollback forgets them with the rest). After COMMIT it appends the
runs to PurgeLog under the number Store.purges then takes. The journal keeps the runs of the
newest commits, at most MAX_RUNS in all; asked for what is older than it keeps (or for a
commit that purged more than MAX_RUNS runs), it answers None, and the backup checks every
segment, as before the journal.

Threads: commits append from the group commit's worker thread, the backup reads on the trio
thread; a lock of its own guards the journal for the few steps of each (never held across
SQLite).
"""

from __future__ import annotations

import sqlite3
import threading
from collections import deque

from .schema import SEQ_BITS

# Runs kept in all (about 40 B each in memory): a burst of deletes scattered over this many
# runs between two uploads is checked run by run; a larger one makes the backup check all.
MAX_RUNS = 4096

CREATE_PURGED = (
    "CREATE TEMP TABLE purged_ids(id INTEGER PRIMARY KEY)",
    "CREATE TEMP TRIGGER note_purged AFTER DELETE ON main.bodies "
    "BEGIN INSERT OR IGNORE INTO purged_ids(id) VALUES (old.id); END",
)
# Consecutive ids of one author as one run (gaps and islands: id minus its rank is constant
# along a run); at most MAX_RUNS + 1 read, so a huge scattered purge costs no more.
PURGED_RUNS = f"""
SELECT id >> {SEQ_BITS}, min(id) & {(1 << SEQ_BITS) - 1}, max(id) & {(1 << SEQ_BITS) - 1}
FROM (SELECT id, id - row_number() OVER (ORDER BY id) AS island FROM purged_ids)
GROUP BY id >> {SEQ_BITS}, island LIMIT {MAX_RUNS + 1}
"""

Run = tuple[int, int, int]  # (author id, first seq, last seq)


def create(db: sqlite3.Connection) -> None:
    for statement in CREATE_PURGED:
        db.execute(statement)


def take_runs(db: sqlite3.Connection) -> list[Run] | None:
    """Inside the write transaction: the runs of ids purged so far, and the table emptied.
    [] if none; None if more than MAX_RUNS (the journal then cannot say which)."""
    runs: list[Run] = db.execute(PURGED_RUNS).fetchall()
    if runs:
        db.execute("DELETE FROM purged_ids")
    return None if len(runs) > MAX_RUNS else runs


class PurgeLog:
    """The runs each purging commit purged, numbered 1, 2, ... (count: the last number)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._max = MAX_RUNS
        self._commits: deque[tuple[int, tuple[Run, ...]]] = deque()
        self._runs = 0  # in _commits
        self._forgotten = 0  # the newest commit number whose runs are no longer kept
        self.count = 0

    def add(self, runs: list[Run] | None) -> None:
        """A commit purged `runs` (None: more than can be said)."""
        with self._lock:
            self.count += 1
            if runs is None or len(runs) > self._max:
                self._commits.clear()
                self._runs, self._forgotten = 0, self.count
                return
            self._commits.append((self.count, tuple(runs)))
            self._runs += len(runs)
            while self._runs > self._max:
                number, dropped = self._commits.popleft()
                self._runs -= len(dropped)
                self._forgotten = number

    def since(self, number: int) -> tuple[int, list[Run] | None]:
        """(count, the runs of the commits after `number`), or (count, None) if the journal no
        longer holds them all."""
        with self._lock:
            if number < self._forgotten:
                return self.count, None
            return self.count, [run for n, runs in self._commits if n > number for run in runs]
