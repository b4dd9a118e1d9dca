"""A conflict reads only the chain blobs stored since this device last knew the chain (issue 20).

Two devices backing up to one relay (the soak's A and B) store their manifests in turn, so
nearly every upload of one meets a version the other stored: a compare-and-swap conflict,
after which the relay's manifest is read. It used to be read whole each time: every delta of
the chain from the head back to the base, each a relay request and a decryption in a worker
thread (about 20 per upload in the soak, more as the chain grew). A chain blob never changes
under its reference (its digest is pinned), so the snapshot at a chain head this device
stored or read is kept (a few of them), and a read stops walking back at such a head.
"""

from __future__ import annotations

from meshd.backup import Backups
from meshd.backupblobs import open_manifest

from .test_backup_chain import BODY, CountingRelay, chained
from .test_backup_leaks import ADDRESS, Host, host  # noqa: F401  (host: a fixture)


class GetCountingRelay(CountingRelay):
    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def segment_get(self, segment_id: bytes) -> bytes | None:
        self.gets += 1
        return await super().segment_get(segment_id)


async def test_a_conflict_fetches_only_the_other_devices_new_chain_blobs(host: Host) -> None:  # noqa: F811
    relay, _ = await chained(host)
    counting = GetCountingRelay()
    counting.__dict__.update({k: v for k, v in relay.__dict__.items() if k != "gets"})
    first, second = Backups(host, lambda *_: None), Backups(host, lambda *_: None)
    assert await first.upload(ADDRESS, counting)
    assert await second.upload(ADDRESS, counting)
    gets_per_conflict, depths = [], []
    for i in range(12):  # the two store in turn: each upload of `first` meets a conflict
        host.logs.write_many_nowait([("s", f"second{i}", b"b" * BODY)])
        assert await second.upload(ADDRESS, counting)
        host.logs.write_many_nowait([("s", f"first{i}", b"a" * BODY)])
        conflicts, gets = counting.conflicts, counting.gets
        assert await first.upload(ADDRESS, counting)
        assert counting.conflicts == conflicts + 1
        gets_per_conflict.append(counting.gets - gets)
        chain = first.state(ADDRESS).manifest.chain  # type: ignore[union-attr]
        depths.append(len(chain.deltas) if chain else 0)
    state = first.state(ADDRESS)
    assert state.manifest is not None and state.manifest.chain is not None
    assert max(depths) >= 10, f"the chain grew to {depths} deltas"
    # The whole chain was read at each conflict (depth + 1 blobs: 1, 3, 5, ... 21 before a new
    # base); now the blob the other device stored since (its delta) and nothing older.
    assert max(gets_per_conflict) <= 1, gets_per_conflict
    # What was read is still the relay's manifest, every blob listed.
    assert counting.stored is not None
    fresh = await open_manifest(host, counting, counting.stored.blob, counting.stored.version, {})  # type: ignore[arg-type]
    assert fresh.chain == state.manifest.chain
    assert {s.id for s in fresh.segments} == {s.id for s in state.manifest.segments}
    assert set(counting.segments) == fresh.blob_ids()


async def test_a_chain_head_with_a_depth_that_does_not_match_is_read_whole(host: Host) -> None:  # noqa: F811
    """A signed blob naming a known head with another depth is not taken from what is kept:
    the chain is walked as stored (and fails to open if it is not one)."""
    relay, opened = await chained(host)
    counting = GetCountingRelay()
    counting.__dict__.update({k: v for k, v in relay.__dict__.items() if k != "gets"})
    backups = Backups(host, lambda *_: None)
    assert await backups.upload(ADDRESS, counting)
    state = backups.state(ADDRESS)
    assert state.manifest is not None and state.manifest.chain is not None
    assert counting.stored is not None
    known = dict(state.chains)
    assert known, "the head read is kept"
    gets = counting.gets
    again = await open_manifest(host, counting, counting.stored.blob, counting.stored.version, {},  # type: ignore[arg-type]
                                state.chains)
    assert counting.gets == gets, "a known head: nothing fetched"
    assert again.chain == state.manifest.chain
    head, (full, chain) = next(iter(known.items()))
    state.chains.clear()
    state.chains[head] = (full, type(chain)(chain.base, chain.deltas[:-1]))  # the depth disagrees
    again = await open_manifest(host, counting, counting.stored.blob, counting.stored.version, {},  # type: ignore[arg-type]
                                state.chains)
    assert counting.gets > gets, "read whole"
    assert again.chain == state.manifest.chain
