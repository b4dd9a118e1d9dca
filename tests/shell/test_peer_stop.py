"""A connection ending while the daemon stops must not end the daemon with an error.

When the daemon stops it cancels its nursery, and every connection's session with it. A
session whose connection was ending at that moment (the peer said goodbye, a duplicate
connection being replaced, a write failing, the disk failing) raises that error next to the
Cancelled of its other tasks. The peer manager's own cancel scope does not catch Cancelled
while its parent is cancelled too (trio leaves it to the outermost cancelled scope), so the
group reaching `_run_connection` held both: it was re-raised whole, the daemon's scope took
the Cancelled out, and the connection's error left the daemon's nursery: `meshd run` exited
with status 1 on SIGTERM (integration test_two_relays_one_wiped_loses_nothing, once in a
full run).
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

import meshd.net.peers as peers_module
from meshd.net.peers import Peer, PeerManager
from meshd.net.transport import PeerClosed
from meshd.store.db import StoreError

KEY = b"\x02" * 32


class FakeConnection:
    remote_static = KEY

    def __init__(self) -> None:
        self.closed_with: str | None = None

    async def aclose(self, reason: str = "") -> None:
        self.closed_with = reason


def manager_with_peer() -> tuple[PeerManager, Peer, list[str]]:
    errors: list[str] = []
    daemon = SimpleNamespace(identity=SimpleNamespace(noise=SimpleNamespace(public=b"\x01" * 32)),
                             count_error=errors.append,
                             peer_changed=lambda peer, up, reason="": None)
    manager = PeerManager(daemon)  # type: ignore[arg-type]
    peer = Peer(b"s" * 32, KEY, "other")
    manager._peers[KEY] = peer  # noqa: SLF001 - the table sync_members would fill
    return manager, peer, errors


def ending_session(error: BaseException, ending: trio.Event) -> Any:
    """A session shaped like session.converse: a nursery with a task of its own, whose body
    raises `error` (its connection ending) once `ending` is set."""
    async def converse(*args: Any, **kwargs: Any) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)  # (the log sync and answer tasks)
            await ending.wait()
            raise error
    return converse


@pytest.mark.parametrize("error", [
    PeerClosed("duplicate connection"),
    trio.BrokenResourceError("socket connection broken"),
    StoreError("cannot write: disk I/O error"),
    ValueError("a bug in the session"),
], ids=["peer-closed", "broken", "store-error", "bug"])
async def test_a_connection_ending_as_the_daemon_stops_does_not_escape(
        error: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    manager, peer, _ = manager_with_peer()
    ending = trio.Event()
    monkeypatch.setattr(peers_module, "converse", ending_session(error, ending))
    reported: list[BaseException] = []
    monkeypatch.setattr(peers_module, "report_bug", lambda where, err: reported.append(err))
    connection = FakeConnection()
    with trio.CancelScope() as daemon_scope:  # the daemon's nursery's scope
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(manager._run_connection, connection, initiated_by_us=False))  # noqa: SLF001
            await trio.testing.wait_all_tasks_blocked()
            assert peer.connection is connection
            # The connection ends, and in the same instant the daemon stops (SIGTERM).
            ending.set()
            manager.close_all("daemon stopping")
            daemon_scope.cancel()
    # On main the error escaped the daemon's nursery (an ExceptionGroup holding it).
    assert daemon_scope.cancelled_caught
    assert connection.closed_with is not None
    assert peer.connection is None
    # A bug is still reported (contained, counted); a connection's end is not a bug.
    bugs = [leaf for group in reported for leaf in group.exceptions]  # type: ignore[attr-defined]
    assert bugs == ([error] if isinstance(error, ValueError) else [])


async def test_a_connection_ending_alone_is_still_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not stopping: the connection's error is handled as before (counted, the reason kept)."""
    manager, peer, errors = manager_with_peer()
    ending = trio.Event()
    monkeypatch.setattr(peers_module, "converse",
                        ending_session(trio.BrokenResourceError("socket connection broken"), ending))
    connection = FakeConnection()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(manager._run_connection, connection, initiated_by_us=False))  # noqa: SLF001
        await trio.testing.wait_all_tasks_blocked()
        ending.set()
    assert connection.closed_with is not None and "BrokenResourceError" in connection.closed_with
    assert errors == ["BrokenResourceError"]
    assert peer.connection is None


async def test_sync_over_cancelled_as_its_connection_ends_is_cancelled() -> None:
    """peersync.sync_over (tools, benchmarks) unwrapped its nursery's group with first_leaf,
    which passes over Cancelled: cancelled as its connection ended, it raised PeerClosed to
    a caller that had cancelled it, instead of being cancelled."""
    from meshd.net.peersync import sync_over

    ending = trio.Event()

    class Connection:
        async def send(self, message: dict[str, Any]) -> None:
            raise AssertionError("nothing is sent")

        def __aiter__(self) -> Connection:
            return self

        async def __anext__(self) -> dict[str, Any]:
            await ending.wait()
            raise PeerClosed("goodbye")

    class Sync:
        async def run(self) -> None:
            await trio.sleep_forever()

    service = SimpleNamespace(peer=lambda send, allowed, **options: Sync())
    with trio.CancelScope() as caller:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(sync_over, Connection(), service, lambda author: True))
            await trio.testing.wait_all_tasks_blocked()
            ending.set()
            caller.cancel()
    assert caller.cancelled_caught
