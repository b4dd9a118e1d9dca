"""The device mailbox state machine against a model relay that misbehaves within the spec's
faults: it loses frames, duplicates and reorders them, disconnects, restarts and forgets an
ack it never confirmed. Whatever happens, the relay deletes only what the device applied,
and once the faults stop everything deposited is applied."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from meshd.protocol.mailbox import FetchRequest, MailboxMisbehaved, MailboxReader


class ModelRelay:
    def __init__(self) -> None:
        self.stored: dict[int, bytes] = {}
        self.next_id = 1
        self.deposited: set[int] = set()
        self.to_relay: list[tuple[str, object]] = []
        # ("envelopes", request, items, more) | ("acked", upto, deleted)
        self.to_device: list[tuple[object, ...]] = []

    def deposit(self, count: int) -> None:
        for _ in range(count):
            self.stored[self.next_id] = self.next_id.to_bytes(4, "big")
            self.deposited.add(self.next_id)
            self.next_id += 1

    def serve(self, index: int, cap: int) -> None:
        kind, request = self.to_relay.pop(index)
        if kind == "fetch":
            assert isinstance(request, FetchRequest)
            after = sorted(i for i in self.stored if i > request.after)
            # A byte cap may cut an answer short; `more` says so.
            items = [(i, self.stored[i]) for i in after[:max(1, min(request.limit, cap))]]
            self.to_device.append(("envelopes", request, items, len(after) > len(items)))
        else:
            assert isinstance(request, int)
            deleted = {i: self.stored.pop(i) for i in list(self.stored) if i <= request}
            self.to_device.append(("acked", request, deleted))

    def restart(self) -> None:
        """Frames in flight are gone, and an ack whose answer was not sent is undone."""
        for message in self.to_device:
            if message[0] == "acked":
                self.stored.update(message[2])  # type: ignore[arg-type]
        self.to_relay.clear()
        self.to_device.clear()


class MailboxUnderFaults(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.relay = ModelRelay()
        self.reader = MailboxReader(window=8)
        self.in_hand: list[tuple[int, bytes]] = []
        self.applied: set[int] = set()

    # -- the relay side --

    # Sizes are drawn as "how far below the maximum", because the search prefers small draws:
    # big deposits and full answers are the common case, short ones the variation.

    @rule(below=st.integers(0, 11))
    def deposit(self, below: int) -> None:
        self.relay.deposit(12 - below)
        self.reader.hint()  # the relay's push: on this connection, it comes after the commit

    # Indexes pick any frame in flight (reordering); taken modulo the queue's length, so
    # every rule is always enabled and the search does not stall on preconditions.

    @rule(index=st.integers(0, 7), below=st.integers(0, 7))
    def relay_serves_any_request(self, index: int, below: int) -> None:
        if self.relay.to_relay:
            self.relay.serve(index % len(self.relay.to_relay), 8 - below)

    @rule(index=st.integers(0, 7), duplicate=st.booleans())
    def device_receives_any_frame(self, index: int, duplicate: bool) -> None:
        queue = self.relay.to_device
        if queue:
            index %= len(queue)
            self._receive(queue[index] if duplicate else queue.pop(index))

    # The faults share one rule, so the search spends most steps on traffic between them.
    @rule(fault=st.sampled_from(["lost-to-relay", "lost-to-device", "timeout", "disconnect",
                                 "restart"]), index=st.integers(0, 7))
    def a_fault(self, fault: str, index: int) -> None:
        if fault.startswith("lost"):
            queue = self.relay.to_device if fault == "lost-to-device" else self.relay.to_relay
            if queue:
                queue.pop(index % len(queue))
        elif fault == "timeout":
            self._time_out()
        elif fault == "disconnect":
            self.relay.to_relay.clear()
            self.relay.to_device.clear()
            self.reader.disconnected()
        else:
            self.relay.restart()
            self.reader.disconnected()

    # -- the device side --

    @rule()
    def device_fetches(self) -> None:
        request = self.reader.next_fetch()
        if request is not None:
            self.relay.to_relay.append(("fetch", request))

    @rule()
    def device_acks(self) -> None:
        upto = self.reader.ack_due()
        if upto is not None:
            self.relay.to_relay.append(("ack", upto))

    def _time_out(self) -> None:
        """A request went unanswered for too long: the device gives up on it."""
        for kind, request in [("fetch", self.reader._fetch), ("ack", self.reader._acking)]:  # noqa: SLF001
            if request is None:
                continue
            if kind == "fetch":
                assert isinstance(request, FetchRequest)
                self.reader.fetch_failed(request)
            else:
                assert isinstance(request, int)
                self.reader.ack_failed(request)

    @rule(disk_full=st.booleans())
    def device_applies_the_oldest(self, disk_full: bool) -> None:
        if not self.in_hand:
            return
        if disk_full:
            self.reader.failed()
            self.in_hand.clear()
            return
        envelope_id, envelope = self.in_hand.pop(0)
        assert envelope == envelope_id.to_bytes(4, "big")
        self.applied.add(envelope_id)
        self.reader.applied(envelope_id)

    def _receive(self, message: tuple[object, ...]) -> None:
        if message[0] == "envelopes":
            _, request, items, more = message
            assert isinstance(request, FetchRequest) and isinstance(items, list)
            self.in_hand.extend(self.reader.fetched(request, items, bool(more)))
        else:
            upto = message[1]
            assert isinstance(upto, int)
            self.reader.ack_done(upto)

    # -- the promise --

    @invariant()
    def the_relay_deleted_only_what_the_device_applied(self) -> None:
        deleted = self.relay.deposited - set(self.relay.stored)
        assert deleted <= self.applied, sorted(deleted - self.applied)

    @invariant()
    def the_window_bounds_what_is_held(self) -> None:
        assert len(self.in_hand) <= self.reader.window
        assert self.reader.applied_through <= self.reader.cursor

    def teardown(self) -> None:
        """Once the faults stop, everything deposited is applied and then deleted."""
        self.relay.to_relay.clear()
        self.relay.to_device.clear()
        self.reader.disconnected()
        for _ in range(10 * (len(self.relay.deposited) + 2)):
            while self.in_hand:
                self.device_applies_the_oldest(disk_full=False)
            request = self.reader.next_fetch()
            if request is not None:
                self.relay.to_relay.append(("fetch", request))
            upto = self.reader.ack_due()
            if upto is not None:
                self.relay.to_relay.append(("ack", upto))
            while self.relay.to_relay:
                self.relay.serve(0, 8)
            while self.relay.to_device:
                self._receive(self.relay.to_device.pop(0))
            if not self.relay.stored and self.reader.idle and not self.in_hand:
                break
        assert self.applied == self.relay.deposited
        assert not self.relay.stored


TestMailboxUnderFaults = MailboxUnderFaults.TestCase
TestMailboxUnderFaults.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


def test_a_fetch_answer_out_of_order_is_misbehaviour() -> None:
    reader = MailboxReader()
    request = reader.next_fetch()
    assert request is not None
    with pytest.raises(MailboxMisbehaved):
        reader.fetched(request, [(5, b"a"), (3, b"b")], more=False)


def test_a_fetch_answer_at_or_before_the_cursor_is_misbehaviour() -> None:
    reader = MailboxReader(applied_through=10)
    request = reader.next_fetch()
    assert request is not None and request.after == 10
    with pytest.raises(MailboxMisbehaved):
        reader.fetched(request, [(10, b"a")], more=False)


def test_more_than_asked_for_is_misbehaviour() -> None:
    reader = MailboxReader(window=2)
    request = reader.next_fetch()
    assert request is not None and request.limit == 2
    with pytest.raises(MailboxMisbehaved):
        reader.fetched(request, [(1, b"a"), (2, b"b"), (3, b"c")], more=False)


def test_nothing_beyond_an_unapplied_envelope_is_acknowledged() -> None:
    reader = MailboxReader()
    request = reader.next_fetch()
    assert request is not None
    assert [i for i, _ in reader.fetched(request, [(1, b"a"), (2, b"b"), (3, b"c")], more=False)] == [1, 2, 3]
    reader.applied(1)
    assert reader.ack_due() == 1
    reader.ack_done(1)
    reader.failed()  # envelope 2 could not be applied (a full disk)
    assert reader.ack_due() is None
    again = reader.next_fetch()
    assert again is not None and again.after == 1, "2 and 3 are fetched again"


def test_a_stale_answer_is_ignored() -> None:
    reader = MailboxReader()
    first = reader.next_fetch()
    assert first is not None
    reader.disconnected()
    second = reader.next_fetch()
    assert second is not None
    assert reader.fetched(first, [(1, b"a")], more=False) == []
    assert reader.fetched(second, [(1, b"a")], more=False) == [(1, b"a")]


def test_no_room_no_fetch_until_something_is_applied() -> None:
    reader = MailboxReader(window=2)
    request = reader.next_fetch()
    assert request is not None
    reader.fetched(request, [(1, b"a"), (2, b"b")], more=True)
    assert reader.next_fetch() is None
    reader.applied(1)
    follow = reader.next_fetch()
    assert follow is not None and (follow.after, follow.limit) == (2, 1)


def test_after_a_reconnect_the_applied_point_is_acknowledged_again() -> None:
    reader = MailboxReader(applied_through=7)
    assert reader.ack_due() == 7
    reader.ack_done(7)
    assert reader.ack_due() is None
    reader.disconnected()
    assert reader.ack_due() == 7
