"""Convergence: N replicas with random writes, random pairwise syncs and interruptions end
with identical views, equal to the reference view of the union of their entries.

Run twice: over MemoryLog replicas (the reference) and over real SQLite stores, whose
incrementally maintained view and body purging must agree with materialise()."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.protocol.crypto import blake2b_256
from meshd.protocol.log import (
    CLEAR,
    DELETE,
    PUT,
    ZERO_HASH,
    Batch,
    Header,
    VerifiedBatch,
    Write,
    compose_batch,
    materialise,
)
from meshd.store.db import Store

from .test_log import WALL_MS, MemoryLog, signer
from .test_sync import sync

REPLICAS = 3
STREAMS = ["s", "t"]
RECORDS = ["a", "b", "c", "d"]


class StoreReplica:
    def __init__(self, path: Path) -> None:
        self.store = Store(path)

    def tip(self, author: bytes) -> tuple[int, bytes]:
        return self.store.tip(author)

    def vector(self) -> dict[bytes, int]:
        return self.store.version_vector()

    def commit(self, verified: VerifiedBatch) -> None:
        self.store.commit_batch(verified, durable=False)

    def batch_since(self, author: bytes, after: int, max_bytes: int) -> Batch | None:
        message = self.store.batch_since(author, after, max_bytes)
        return None if message is None else Batch.from_message(message)

    def headers(self) -> list[Header]:
        return [Header.decode(h) for h in self.store.headers()]


writes = st.tuples(
    st.just("write"),
    st.integers(0, REPLICAS - 1),  # who writes
    st.lists(
        st.tuples(
            st.sampled_from([PUT, PUT, PUT, DELETE, CLEAR]),
            st.sampled_from(STREAMS),
            st.sampled_from(RECORDS),
            st.binary(max_size=40),
        ),
        min_size=1, max_size=6,
    ),
    st.integers(0, 3),  # wall clock in ms past WALL_MS: equal timestamps across authors happen
)
syncs = st.tuples(
    st.just("sync"),
    st.integers(0, REPLICAS - 1),
    st.integers(0, REPLICAS - 1),
    st.one_of(st.none(), st.integers(0, 12)),  # messages delivered before the link drops
)
scenarios = st.lists(st.one_of(writes, syncs), min_size=1, max_size=25)


def run_scenario(replicas: list[Any], steps: list[tuple[Any, ...]]) -> None:
    signers = [signer(100 + i) for i in range(len(replicas))]
    last_hlc = [0] * len(replicas)
    for step in steps:
        if step[0] == "write":
            _, who, ops, wall = step
            batch = [
                Write(stream, "" if op == CLEAR else record, op, body if op == PUT else b"")
                for op, stream, record, body in ops
            ]
            seq, hash = replicas[who].tip(bytes(signers[who].public))
            # Small heads interval: batches get cut at many points.
            composed = compose_batch(signers[who], seq, hash, last_hlc[who], WALL_MS + wall,
                                     batch, head_every_bytes=60)
            replicas[who].commit(composed)
            last_hlc[who] = composed.max_hlc
        else:
            _, left, right, cut = step
            if left != right:
                sync(replicas[left], replicas[right], batch_bytes=150,
                     cut_after=float("inf") if cut is None else cut)
    for left in range(len(replicas)):
        for right in range(len(replicas)):
            if left != right:
                sync(replicas[left], replicas[right], batch_bytes=150)

    vectors = [r.vector() for r in replicas]
    assert all(v == vectors[0] for v in vectors)
    views = [materialise(r.headers()) for r in replicas]
    assert all(v == views[0] for v in views)
    for replica in replicas:
        if isinstance(replica, StoreReplica):
            assert store_view(replica.store) == views[0]
            # Only live winners keep a body: everything superseded, deleted or cleared is gone.
            kept = replica.store._db.execute("SELECT count(*) FROM bodies").fetchone()[0]  # noqa: SLF001
            assert kept == sum(len(records) for records in views[0].values())


def store_view(store: Store) -> dict[str, list[tuple[str, bytes, int, int, bytes]]]:
    """The store's view in materialise()'s terms (body hashes of the bodies it kept)."""
    from meshd.protocol.log import ViewRecord

    view: dict[str, list[ViewRecord]] = {}
    for stream, _ in store.streams():
        records = [
            ViewRecord(record_id, order[8:40], int.from_bytes(order[40:], "big"),
                       int.from_bytes(order[:8], "big"), blake2b_256(body))
            for order, record_id, body in store.read(stream, b"", 10_000)
        ]
        if records:
            view[stream] = records
    return view  # type: ignore[return-value]


@settings(max_examples=300, deadline=None)
@given(scenarios)
def test_memory_replicas_converge(steps: list[tuple[Any, ...]]) -> None:
    run_scenario([MemoryLog() for _ in range(REPLICAS)], steps)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios)
def test_store_replicas_converge_to_the_reference_view(steps: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        replicas = [StoreReplica(Path(directory) / f"{i}.db") for i in range(REPLICAS)]
        try:
            run_scenario(replicas, steps)
        finally:
            for replica in replicas:
                replica.store.close()


def test_a_store_keeps_no_body_of_a_dead_entry() -> None:
    """Superseded, deleted and cleared bodies are purged; live winners keep theirs."""
    with tempfile.TemporaryDirectory() as directory:
        replica = StoreReplica(Path(directory) / "x.db")
        me = signer(1)
        writes = [Write("s", "a", PUT, b"old"), Write("s", "a", PUT, b"new"),
                  Write("s", "b", PUT, b"gone"), Write("s", "b", DELETE),
                  Write("t", "c", PUT, b"cleared"), Write("t", "", CLEAR),
                  Write("t", "d", PUT, b"after")]
        replica.commit(compose_batch(me, 0, ZERO_HASH, 0, WALL_MS, writes))
        bodies = {bytes(b) for (b,) in replica.store._db.execute("SELECT body FROM bodies")}  # noqa: SLF001
        assert bodies == {b"new", b"after"}
        replica.store.close()
