"""A restore never holds the event loop (issue 20): recovery used to verify and commit every
backed-up batch on the trio thread (the daemon's API, relays and peers waited for the whole
restore of a log of any size). Each batch now commits in a worker thread
(meshd/relay/recovery.py's ingester), and the manifest's segments are ordered in one."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from meshd.backup import Backups
from meshd.backupblobs import open_manifest
from meshd.net.logsync import LogService
from meshd.protocol.backupset import Manifest
from meshd.protocol.log import VerifiedBatch
from meshd.relay.recovery import ingester
from meshd.restore import restore_logs
from meshd.store.db import Store

from ..protocol.test_log import signer
from .test_backup_batching import ServingRelay
from .test_backup_leaks import ADDRESS, Host, host  # noqa: F401  (host: a fixture)


@dataclass
class Restoring:
    """The part of a recovering daemon the ingester uses."""

    logs: LogService

    def is_author_allowed(self, sign_key: bytes) -> bool:
        return True


async def test_a_restore_commits_in_worker_threads_while_the_loop_serves(
        host: Host, tmp_path: Path) -> None:  # noqa: F811
    relay = ServingRelay()
    assert await Backups(host, lambda *_: None).upload(ADDRESS, relay)
    assert relay.stored is not None
    opened = await open_manifest(host, relay, relay.stored.blob, relay.stored.version, {})  # type: ignore[arg-type]
    keys = host.circle.current_keys(host.identity.noise)
    store = Store(tmp_path / "restored.db")
    target = Restoring(LogService(store, signer(7), lambda: int(time.time() * 1000)))
    on_loop: list[bool] = []
    committing = trio.Event()
    served = threading.Event()
    commit = store.commit_batch

    def watched(batch: VerifiedBatch, *, durable: bool) -> None:
        on_loop.append(threading.current_thread() is threading.main_thread())
        if len(on_loop) == 1:  # the first commit waits until the trio thread served a task
            trio.from_thread.run_sync(committing.set)  # (raises on the trio thread itself)
            served.wait()
        commit(batch, durable=durable)

    store.commit_batch = watched  # type: ignore[method-assign]

    async def serve() -> None:
        await committing.wait()
        served.set()  # the loop ran this while the restore's commit was under way

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        restored = await restore_logs(relay, host.circle.circle_id,  # type: ignore[arg-type]
                                      Manifest.from_snapshot(opened.snapshot()),
                                      {keys.number: keys}.get, ingester(target))  # type: ignore[arg-type]
    assert restored == 400 and len(on_loop) >= 2  # two segments at least
    assert not any(on_loop), "every batch committed off the trio thread"
    assert store.version_vector() == host.store.version_vector()
    store.close()
