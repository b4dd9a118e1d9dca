"""An upload never spans two incarnations of a relay.

The relay is wiped (restarted empty, same key and port) between two requests of an upload:
the session that upload began on ends, and a new session registers with a new incarnation,
which resets what this device kept for that relay (RelayLinks._new_incarnation). Requests
used to go to whichever session was current, so the rest of the upload reached the empty
relay with the old incarnation's version in hand, and an honest wipe was reported as a
rollback (CI, 2026-12-02: test_relay_wipes, "backup version 0 is older than version 1").
An upload now keeps to the session it began on: the wipe ends it as a plain failure, and
the next upload stores version 1 at the new incarnation.
"""

from __future__ import annotations

from meshd.backup import Backups
from meshd.protocol.relay import UNAVAILABLE, RelayError

from .test_backup_leaks import ADDRESS, FakeRelay, Host, host  # noqa: F401  (host: a fixture)


class GoneRelay(FakeRelay):
    """A session whose connection ended: every request fails as a closed connection does."""

    async def _gone(self, *_: object) -> None:
        raise RelayError(UNAVAILABLE, "connection lost: connection is closed")

    backup_get = backup_put = segment_put = segment_get = segment_delete = _gone  # type: ignore[assignment]


class WipedClient:
    """A RelayClient whose relay is wiped after `wipe_after` segment uploads of the session
    it is on: that session ends, a new one to the empty relay registers, and the daemon
    forgets the backup state it kept for the old incarnation, as RelayLinks does."""

    def __init__(self, backups: Backups, wipe_after: int) -> None:
        self.session: FakeRelay | None = FakeRelay()
        self.backups = backups
        self.wipe_after = wipe_after
        self.wipes = 0
        self._arm()

    def _arm(self) -> None:
        session = self.session
        assert session is not None
        real_put = session.segment_put

        async def put_then_wipe(segment_id: bytes, blob: bytes) -> None:
            await real_put(segment_id, blob)
            if self.wipe_after and len(session.segments) >= self.wipe_after:
                self.wipe_after = 0
                self.wipes += 1
                session.__class__ = GoneRelay  # the old connection is closed
                self.session = FakeRelay()  # the wiped relay, registered anew
                self.backups.forget(ADDRESS)

        session.segment_put = put_then_wipe  # type: ignore[method-assign]

    # The RelayClient methods: each goes to the session current when it is called.
    async def backup_get(self):  # type: ignore[no-untyped-def]
        assert self.session is not None
        return await self.session.backup_get()

    async def backup_put(self, expected: int, version: int, blob: bytes) -> None:
        assert self.session is not None
        await self.session.backup_put(expected, version, blob)

    async def segment_put(self, segment_id: bytes, blob: bytes) -> None:
        assert self.session is not None
        await self.session.segment_put(segment_id, blob)

    async def segment_delete(self, ids: list[bytes]) -> None:
        assert self.session is not None
        await self.session.segment_delete(ids)


async def test_a_wipe_between_two_requests_of_an_upload_is_not_a_rollback(host: Host) -> None:  # noqa: F811
    misbehaviour: list[tuple[str, str, str]] = []
    backups = Backups(host, lambda *args: misbehaviour.append(args))
    client = WipedClient(backups, wipe_after=0)
    assert await backups.upload(ADDRESS, client)  # type: ignore[arg-type]
    assert backups.state(ADDRESS).version == 1

    host.logs.write_many_nowait([("s", f"more {i}", b"y" * 3000) for i in range(400)])
    client.wipe_after = len(client.session.segments) + 1  # type: ignore[union-attr]
    client._arm()
    await backups.upload(ADDRESS, client)  # type: ignore[arg-type]
    assert client.wipes == 1
    assert misbehaviour == []
    assert "rollback" not in (backups.state(ADDRESS).error or "")

    backups.state(ADDRESS).retry_at = 0.0
    assert await backups.upload(ADDRESS, client)  # type: ignore[arg-type]
    new_relay = client.session
    assert new_relay is not None and new_relay.stored is not None
    assert new_relay.stored.version == 1  # the new incarnation's first version
    assert misbehaviour == []
