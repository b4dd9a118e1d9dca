"""Nothing proportional to the backup's size runs on the trio thread (issue 20, item 2).

The manifest lists up to 1,024 loose segments per author, plus every full one. Planning
(next_build), diffing, rebasing, listing the blob ids, indexing and reading a manifest back
each walk every segment: all of it runs in a worker thread, so a large backup does not stall
the event loop. This test records the thread of every call of a Manifest method that walks
the segments, during uploads that build, merge, index, chain, and meet a conflict.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from meshd.backup import Backups
from meshd.protocol import backupset
from meshd.protocol.backupset import Manifest

from .test_backup_chain import BODY, CountingRelay
from .test_backup_leaks import ADDRESS, Host, host  # noqa: F401  (host: a fixture)

# Every Manifest method whose cost grows with the number of segments listed.
WALKS = ("by_author", "of", "covered", "replaced", "blob_ids", "to_index", "snapshot",
         "with_segments", "resolved", "_indexed")


@pytest.fixture
def on_trio_thread(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the walks called on the thread that runs trio (the test's own)."""
    trio_thread = threading.get_ident()
    calls: list[str] = []

    def watch(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == trio_thread:
                calls.append(name)
            return method(*args, **kwargs)
        return watched

    for name in WALKS:
        monkeypatch.setattr(Manifest, name, watch(name, getattr(Manifest, name)))
    from_snapshot = Manifest.from_snapshot.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Manifest, "from_snapshot", classmethod(watch("from_snapshot", from_snapshot)))
    return calls


async def test_the_upload_walks_the_manifest_only_off_the_trio_thread(
        host: Host, on_trio_thread: list[str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(backupset, "INDEX_REFS", 1)  # the first full segment gets an index
    relay = CountingRelay()
    first, second = Backups(host, lambda *_: None), Backups(host, lambda *_: None)
    assert await first.upload(ADDRESS, relay)  # the first backup: full segments, an index
    for i in range(40):  # one-entry uploads: loose segments, a chain of deltas
        host.logs.write_many_nowait([("s", f"one{i}", bytes([i]) * BODY)])
        assert await first.upload(ADDRESS, relay)
    host.logs.write_many_nowait([("s", "raced", b"c" * BODY)])
    assert await second.upload(ADDRESS, relay)  # reads the chain back, stores first
    host.logs.write_many_nowait([("s", "later", b"d" * BODY)])
    assert await first.upload(ADDRESS, relay)  # a conflict: fetch, rebase, store again
    assert relay.conflicts == 1
    state = first.state(ADDRESS)
    assert state.manifest is not None and state.manifest.chain is not None
    assert state.manifest.indexes, "the backup was indexed"
    assert on_trio_thread == [], sorted(set(on_trio_thread))
