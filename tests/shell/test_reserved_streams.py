"""The reserved streams meshd/relays and meshd/names hold what any member, or any app through
the API, wrote there (protocol/logs.md: records that are not a relay address or a device's
own name are ignored). Ignoring them must stay cheap (review s9): on a real daemon, 20,000
bogus records in meshd/relays made every change of that stream log 20,000 warnings and hold
the event loop ~250 ms; 20,000 in meshd/names made every GET /v1/status, /v1/devices and
/v1/peers read them all on the event loop (1 ms -> ~47 ms each), on every device of the
circle, since the records sync."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio.testing

from meshd import names as names_module
from meshd.names import NAMES_STREAM
from meshd.net.logsync import LogService
from meshd.relay import shared
from meshd.statusview import StatusView
from meshd.store.db import Store

from ..protocol.test_log import signer
from .test_commit_wakeups import running_daemon
from .test_logsync import WALL_MS, Link, service, wait_until

RELAY = "127.0.0.1:9#" + "A" * 43
BOGUS = 2000


def test_ignored_records_of_the_relay_list_cost_one_log_line_per_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logs = service(tmp_path, 1)
    logs.write_many_nowait([(shared.RELAYS_STREAM, f"bogus{i}", b"use") for i in range(BOGUS)]
                           + [(shared.RELAYS_STREAM, RELAY, b"use"),
                              (shared.RELAYS_STREAM, "127.0.0.1:10#" + "B" * 43, b"maybe")])
    with caplog.at_level(logging.WARNING, logger=shared.__name__):
        assert shared.shared_relays(logs) == {RELAY: True}
        assert shared.shared_relays(logs) == {RELAY: True}
    lines = [record.getMessage() for record in caplog.records if record.name == shared.__name__]
    assert len(lines) == 2  # one per read of the list, however many records it ignores
    assert all(f"{BOGUS + 1} records" in line for line in lines)


def relay_address(n: int) -> str:
    return f"127.0.0.1:{20000 + n}#" + base64.urlsafe_b64encode(bytes([n % 256, n // 256]) * 16).decode().rstrip("=")


async def test_a_device_links_to_a_bounded_number_of_the_circle_s_relays(tmp_path: Path) -> None:
    """One batch request of 500 valid-looking addresses made a daemon link to all 500 (each
    with its dials and timers) and answer every API request in 1-3 s, on every device. The
    follower takes the first MAX_SHARED_RELAYS marked use, in view order (the same ones on
    every device), and still drops a relay marked remove."""
    written = 3 * shared.MAX_SHARED_RELAYS
    async with running_daemon(tmp_path) as daemon:
        await trio.testing.wait_all_tasks_blocked()
        links = daemon.relay_links
        assert links is not None
        before = list(links._addresses)  # the configured relay
        daemon.logs.write_many_nowait([(shared.RELAYS_STREAM, relay_address(n), b"use")
                                       for n in range(written)])
        await trio.testing.wait_all_tasks_blocked()
        linked = [relay_address(n) for n in range(written) if links.uses(relay_address(n))]
        assert linked == [relay_address(n) for n in range(shared.MAX_SHARED_RELAYS)]
        assert links._addresses == before + linked
        daemon.logs.write_nowait(shared.RELAYS_STREAM, relay_address(0), b"remove")
        await trio.testing.wait_all_tasks_blocked()
        assert not links.uses(relay_address(0))
        assert sum(links.uses(relay_address(n)) for n in range(written)) == shared.MAX_SHARED_RELAYS


def test_the_chosen_names_are_read_again_only_after_the_names_stream_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = service(tmp_path, 1)
    logs.write_many_nowait([(NAMES_STREAM, f"bogus{i}", b"evil") for i in range(BOGUS)])
    reads = 0
    chosen = names_module.chosen_names

    def counting(logs: Any) -> dict[bytes, str]:
        nonlocal reads
        reads += 1
        return chosen(logs)
    monkeypatch.setattr(names_module, "chosen_names", counting)
    view = StatusView(SimpleNamespace(logs=logs))  # type: ignore[arg-type]
    for _ in range(3):
        assert view.names() == {}
    logs.write_nowait("notes", "n1", b"another stream")
    assert view.names() == {}
    assert reads == 1  # was one per call: per status, devices and peers request
    logs.write_nowait(NAMES_STREAM, logs.author.hex(), b"kitchen")
    assert view.names() == {bytes(logs.author): "kitchen"}
    assert reads == 2


class _Links:
    """The relay links' part the list's follower uses (RelayLinks: uses, add, remove)."""

    def __init__(self) -> None:
        self.addresses: list[str] = []

    async def add(self, address: str, token: bytes | None = None) -> dict[str, Any]:
        if address not in self.addresses:
            self.addresses.append(address)
        return {}

    def uses(self, address: str) -> bool:
        return address in self.addresses

    def remove(self, address: str) -> dict[str, Any]:
        self.addresses.remove(address)
        return {}


async def test_relays_pushed_past_the_bound_by_synced_records_are_dropped(tmp_path: Path) -> None:
    """Review s9-2: a device linked the first MAX_SHARED_RELAYS of the list, then records
    that sort before them in view order arrived by sync (another device's, written earlier
    while the two were apart): the follower linked those too and kept the ones they pushed
    past the bound, so the device used 2 * MAX_SHARED_RELAYS relays, not the ones every
    other device takes (main: 32 links here)."""
    cap = shared.MAX_SHARED_RELAYS
    here = service(tmp_path, 1)
    apart = LogService(Store(tmp_path / "apart.db"), signer(2), lambda: WALL_MS - 60_000)
    here.write_many_nowait([(shared.RELAYS_STREAM, relay_address(n), b"use") for n in range(cap)])
    apart.write_many_nowait([(shared.RELAYS_STREAM, relay_address(cap + n), b"use")
                             for n in range(cap)])
    links = _Links()

    async def start_relay_links() -> _Links:
        return links
    host = SimpleNamespace(logs=here, config=SimpleNamespace(relays=(relay_address(3),)),
                           events=SimpleNamespace(publish=lambda *args, **kwargs: None),
                           relay_links=links, start_relay_links=start_relay_links)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(shared.follow, host)
        await trio.testing.wait_all_tasks_blocked()
        assert links.addresses == [relay_address(n) for n in range(cap)]
        Link(here, apart).start(nursery)
        await wait_until(lambda: here.version_vector() == apart.version_vector(), here, apart)
        await trio.testing.wait_all_tasks_blocked()
        wanted = [address for address, use in shared.shared_relays(here).items() if use]
        assert wanted == [relay_address(cap + n) for n in range(cap)]  # the earlier ones
        # The config file's relay stays (only the file controls it); the rest follow the list.
        assert sorted(links.addresses) == sorted([*wanted, relay_address(3)])
        nursery.cancel_scope.cancel()


async def test_sharing_one_relay_past_the_bound_is_refused_before_anything_changes(
        tmp_path: Path) -> None:
    """Review s9-2: POST /v1/relays answered "added" for a relay past the first
    MAX_SHARED_RELAYS marked use; every device's follower then dropped it, or dropped another
    one that sorts after it, while the caller was told it was in use. Now refused with
    409 relay-list-full, nothing linked and nothing published; a relay already in the list
    is still accepted (adding is idempotent)."""
    from meshd import errors
    cap = shared.MAX_SHARED_RELAYS
    async with running_daemon(tmp_path) as daemon:
        daemon.logs.write_many_nowait([(shared.RELAYS_STREAM, relay_address(n), b"use")
                                       for n in range(cap)])
        await trio.testing.wait_all_tasks_blocked()
        links = daemon.relay_links
        assert links is not None
        extra = relay_address(cap)
        with pytest.raises(errors.Conflict) as refused:
            await daemon.add_relay(extra)
        assert refused.value.code == "relay-list-full"
        assert str(cap) in refused.value.message
        await trio.testing.wait_all_tasks_blocked()
        assert not links.uses(extra)
        assert extra not in shared.shared_relays(daemon.logs)
        assert daemon.logs.read(shared.RELAYS_STREAM, after=None, limit=100)["records"][-1]["id"] \
            != extra
        result = await daemon.add_relay(relay_address(0))  # already shared: fine
        assert result["shared"] is True
        daemon.logs.write_nowait(shared.RELAYS_STREAM, relay_address(1), b"remove")
        await trio.testing.wait_all_tasks_blocked()
        assert (await daemon.add_relay(extra))["shared"] is True  # room again
        await trio.testing.wait_all_tasks_blocked()
        assert links.uses(extra)
