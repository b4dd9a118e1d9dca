"""meshd/relay/deposits.py over a real SQLite store and a fake relay session: the durable
state writes made per envelope never run on the trio thread (each is an fsync, and may
wait for a group commit holding the write lock, while every API request waits behind it),
what they save is what the round deposited, and a vector that moves the cursor back while
it is being saved wins."""

from __future__ import annotations

import threading
from collections.abc import Callable
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
from meshd.relay.linkhost import deposited_key
from meshd.store.db import Store

OWN = b"\x01" * 32
AWAY = b"\x02" * 32  # a member with no direct connection: it gets envelopes


class RecordingStore(Store):
    """Records the state keys written on the trio (main) thread; `saved` is set once the
    deposit cursor for AWAY was saved at `until` `times` times."""

    def __init__(self, path: Path, until: int, times: int = 1) -> None:
        super().__init__(path)
        self.on_trio_thread: list[str] = []
        self.until = str(until).encode()
        self.times = times
        self.saved = trio.Event()
        self.announced = trio.Event()  # the circle's records deposited (on the trio thread)

    def set_state(self, key: str, value: bytes) -> None:
        on_trio_thread = threading.current_thread() is threading.main_thread()
        if on_trio_thread:
            self.on_trio_thread.append(key)
        super().set_state(key, value)
        if key.startswith("relay.records.") and on_trio_thread:
            self.announced.set()
        if key == deposited_key(AWAY) and value == self.until:
            self.times -= 1
            if self.times > 0:
                return
            if on_trio_thread:
                self.saved.set()
            else:
                trio.from_thread.run_sync(self.saved.set)


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
    store = RecordingStore(tmp_path / "m.db", until=commits)
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
        await store.saved.wait()
        nursery.cancel_scope.cancel()
    return store, session


@pytest.mark.usefixtures("sealing")
async def test_a_deposit_round_saves_its_state_off_the_trio_thread(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    store, session = await _burst(tmp_path, 5)
    assert session.letters  # the round ran: records announced and entries deposited
    carrying = [letter for letter in session.letters if "head" in letter["payload"]]
    # Nothing lost or repeated: each envelope continues where the one before ended, and the
    # seqs are consecutive; the saved seq and cursor are the last ones deposited.
    assert carrying[0]["payload"]["after"] == 0
    for before, after in zip(carrying, carrying[1:], strict=False):
        assert after["payload"]["after"] == before["payload"]["head"]["seq"]
    seqs = [letter["seq"] for letter in session.letters]
    assert seqs == list(range(1, len(seqs) + 1))
    assert store.get_state(f"relay.seq.{AWAY.hex()}") == str(seqs[-1]).encode()
    assert store.get_state(deposited_key(AWAY)) == b"5"
    # The writes made per envelope (its seq, the cursor) never on the trio thread; the
    # records announced once per circle change may be.
    per_envelope = [key for key in store.on_trio_thread
                    if key.startswith(("relay.seq.", "relay.deposited.", "relay.unsent."))]
    assert per_envelope == []
    store.close()



@pytest.mark.usefixtures("sealing")
async def test_a_burst_of_commits_is_one_envelope(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Five commits 50 ms apart (20 writes/s): the round starts DEPOSIT_GATHER_S after the
    first wake and carries all five in one envelope (issue 20: one envelope per commit was
    a seal, a relay request and two durable writes per entry)."""
    store = RecordingStore(tmp_path / "m.db", until=5)
    logs = FakeLogs()
    session = FakeSession(until=5)
    deposits = Deposits(_host(store, logs), {"relay": SimpleNamespace(session=session)}, {},
                        LocalErrorBackoff())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deposits.run)
        await store.announced.wait()  # the first round (at start): records, no entries yet
        for _ in range(5):
            logs.tip += 1
            deposits.wake()
            await trio.sleep(0.05)
        await session.covered.wait()
        await store.saved.wait()
        nursery.cancel_scope.cancel()
    carrying = [letter for letter in session.letters if "head" in letter["payload"]]
    assert [(c["payload"]["after"], c["payload"]["head"]["seq"]) for c in carrying] == [(0, 5)]
    store.close()


class RewindingStore(RecordingStore):
    """While the deposit cursor is being saved at 3 (from 2), a vector from AWAY (it holds
    our log up to 1 only: a relay lost the rest) arrives on the trio thread and moves the
    cursor back, before the save lands."""

    deposits: Deposits
    rewound = False

    def set_state(self, key: str, value: bytes) -> None:
        if key == deposited_key(AWAY) and value == b"3" and not self.rewound:
            self.rewound = True
            if threading.current_thread() is threading.main_thread():
                self.deposits.vector_received(AWAY, {OWN: 1})
            else:
                trio.from_thread.run_sync(self.deposits.vector_received, AWAY, {OWN: 1})
        super().set_state(key, value)


@pytest.mark.usefixtures("sealing")
async def test_a_vector_that_rewinds_the_cursor_while_it_is_saved_wins(tmp_path: Path) -> None:
    store = RewindingStore(tmp_path / "m.db", until=3, times=2)
    store.set_state(deposited_key(AWAY), b"2")  # deposited up to 2 before
    logs = FakeLogs()
    logs.tip = 3
    session = FakeSession(until=3)
    deposits = Deposits(_host(store, logs), {"relay": SimpleNamespace(session=session)}, {},
                        LocalErrorBackoff())
    store.deposits = deposits
    with trio.fail_after(30):  # the real clock: a lost rewind leaves nothing to deposit
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deposits.run)
            # The cursor saved at 3 twice: once as the rewind arrived, once after the
            # entries after 1 were deposited again.
            await store.saved.wait()
            nursery.cancel_scope.cancel()
    afters = [letter["payload"]["after"] for letter in session.letters if "head" in letter["payload"]]
    assert afters == [2, 1], afters
    assert store.get_state(deposited_key(AWAY)) == b"3"
    store.close()


def test_only_own_commits_for_a_device_away_wake_the_deposit_loop(tmp_path: Path) -> None:
    """links.py hears every commit: a commit of another author's entries (our tip did not
    move), or one while every device is connected, wakes no round (main: a round, two task
    steps and the round's reads, at every commit); our own commit while a device is away
    does."""
    store = Store(tmp_path / "m.db")
    logs = FakeLogs()
    host = _host(store, logs)
    connected: set[bytes] = set()
    host.peer_manager = SimpleNamespace(connected_sign_keys=lambda: connected)
    deposits = Deposits(host, {}, {}, LocalErrorBackoff())
    commit = getattr(deposits, "committed", deposits.wake)  # (main: links.py woke it)

    def wakes(change: Callable[[], None]) -> bool:
        deposits._wakeup = trio.Event()  # (as the loop does before it waits)
        change()
        commit()
        return deposits._wakeup.is_set()

    def own_entry() -> None:
        logs.tip += 1

    assert wakes(own_entry)  # ours, with AWAY away
    assert not wakes(lambda: None)  # another author's: our tip did not move (main: woken)
    connected.add(AWAY)
    assert not wakes(own_entry)  # ours, every device connected (main: woken)
    connected.clear()
    assert wakes(own_entry)  # AWAY away again (peers_changed woke the loop already)
    store.close()
