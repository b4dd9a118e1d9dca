"""meshd/relay/deposits.py over a real SQLite store and a fake relay session: a burst of
local commits is deposited as a few envelopes, not one per commit, and the durable state
writes of a deposit round never run on the trio thread (each is an fsync, and may wait for
a group commit holding the write lock, while every API request waits behind it)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from meshd.localerrors import LocalErrorBackoff
from meshd.relay import deposits as deposits_module
from meshd.relay.deposits import Deposits
from meshd.store.db import Store

OWN = b"\x01" * 32
AWAY = b"\x02" * 32  # a member with no direct connection: it gets envelopes


class RecordingStore(Store):
    """Records the state keys written on the trio (main) thread."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.on_trio_thread: list[str] = []

    def set_state(self, key: str, value: bytes) -> None:
        if threading.current_thread() is threading.main_thread():
            self.on_trio_thread.append(key)
        super().set_state(key, value)


class FakeLogs:
    def __init__(self) -> None:
        self.tip = 0

    def version_vector(self) -> dict[bytes, int]:
        return {OWN: self.tip} if self.tip else {}

    def batch_since(self, author: bytes, after_seq: int, max_bytes: int) -> dict[str, Any] | None:
        if after_seq >= self.tip:
            return None
        return {"t": "batch", "after": after_seq, "head": {"seq": self.tip}}


class FakeSession:
    """Takes every deposit at once; `covered` is set once a letter carries the log up to `until`."""

    def __init__(self, until: int) -> None:
        self.letters: list[dict[str, Any]] = []
        self.until = until
        self.covered = trio.Event()

    async def deposit(self, mailbox: bytes, envelope: bytes) -> None:
        letter = msgpack.unpackb(envelope)
        self.letters.append(letter)
        if letter["payload"].get("head", {}).get("seq", 0) >= self.until:
            self.covered.set()


def _host(store: Store, logs: FakeLogs) -> Any:
    devices = [SimpleNamespace(sign_key=OWN), SimpleNamespace(sign_key=AWAY)]
    circle = SimpleNamespace(
        heads=[], records=lambda: [],
        state=SimpleNamespace(devices=lambda: devices, is_member=lambda key: True, members={}),
        current_keys=lambda noise: "keys", announcement_keys=lambda noise, dh, n: ["keys"])
    return SimpleNamespace(
        store=store, logs=logs, circle=circle, is_member=True, rng=None,
        identity=SimpleNamespace(signing=SimpleNamespace(public=OWN), noise=None),
        metrics=SimpleNamespace(relay_deposits=SimpleNamespace(inc=lambda **labels: None)),
        events=SimpleNamespace(publish=lambda *args, **fields: None),
        peer_manager=SimpleNamespace(connected_sign_keys=set))


@pytest.fixture
def sealing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Envelopes as plain msgpack (the sealing itself is tested in tests/protocol)."""
    monkeypatch.setattr(deposits_module, "mailbox_id", lambda keys, recipient: b"m" + recipient[:4])
    monkeypatch.setattr(deposits_module, "seal_envelope",
                        lambda *, keys, mailbox, signer, seq, payload, rng:
                        msgpack.packb({"seq": seq, "payload": payload}))


async def _burst(tmp_path: Path, commits: int) -> tuple[RecordingStore, FakeSession]:
    """`commits` local commits 50 ms apart (20 writes/s), each waking the deposits as
    links.py's local_commit does; returns once a letter carried the last one."""
    store = RecordingStore(tmp_path / "m.db")
    logs = FakeLogs()
    session = FakeSession(until=commits)
    deposits = Deposits(_host(store, logs), {"relay": SimpleNamespace(session=session)}, {},
                        LocalErrorBackoff())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deposits.run)
        for _ in range(commits):
            logs.tip += 1
            deposits.wake()
            await trio.sleep(0.05)
        await session.covered.wait()
        nursery.cancel_scope.cancel()
    return store, session


@pytest.mark.usefixtures("sealing")
async def test_a_burst_of_commits_is_deposited_as_a_few_envelopes(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    store, session = await _burst(tmp_path, 20)
    carrying = [letter for letter in session.letters if "head" in letter["payload"]]
    # 20 commits in 1 s: one envelope per commit before; now a round gathers what is
    # committed in its first quarter second (at most 1 s / 0.25 s + 2 rounds).
    assert len(carrying) <= 6, len(carrying)
    # Nothing is lost or repeated: each envelope continues where the one before ended,
    # with consecutive seqs.
    assert [letter["payload"]["after"] for letter in carrying][0] == 0
    for before, after in zip(carrying, carrying[1:], strict=False):
        assert after["payload"]["after"] == before["payload"]["head"]["seq"]
    seqs = [letter["seq"] for letter in session.letters]
    assert seqs == list(range(1, len(seqs) + 1))
    store.close()


@pytest.mark.usefixtures("sealing")
async def test_a_deposit_round_saves_its_state_off_the_trio_thread(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    store, session = await _burst(tmp_path, 5)
    assert session.letters  # the round ran: records announced and entries deposited
    assert store.get_state(f"relay.seq.{AWAY.hex()}") is not None
    assert store.on_trio_thread == []
    store.close()

