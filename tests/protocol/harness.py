"""A pair of sans-IO channels wired by a fake link (h11's ConnectionPair, for Noise)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from meshd.protocol.channel import NEED_DATA, Channel, Event, XXHandshake
from meshd.protocol.crypto import DHKeyPair, PublicKey


def seeded_rng(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def drain(channel: Channel) -> list[Event]:
    events: list[Event] = []
    while (event := channel.next_event()) is not NEED_DATA:
        events.append(event)
    return events


class ChannelPair:
    """alice (initiator) and bob (responder), each with a static key, and a link."""

    def __init__(
        self,
        rng: Callable[[int], bytes] | None = None,
        *,
        now: float = 0.0,
        alice_accepts: Callable[[PublicKey], bool] | None = None,
        bob_accepts: Callable[[PublicKey], bool] | None = None,
        **channel_options: object,
    ) -> None:
        rng = rng or seeded_rng(0)
        self.alice_static = DHKeyPair.generate(rng)
        self.bob_static = DHKeyPair.generate(rng)
        self.alice = Channel(
            XXHandshake(
                initiator=True,
                static=self.alice_static,
                rng=rng,
                authorize=alice_accepts or (lambda key: key == self.bob_static.public),
            ),
            now=now,
            **channel_options,  # type: ignore[arg-type]
        )
        self.bob = Channel(
            XXHandshake(
                initiator=False,
                static=self.bob_static,
                rng=rng,
                authorize=bob_accepts or (lambda key: key == self.alice_static.public),
            ),
            now=now,
            **channel_options,  # type: ignore[arg-type]
        )
        # Bytes sent but not yet delivered, per direction.
        self.in_flight = {"alice": bytearray(), "bob": bytearray()}

    def side(self, name: str) -> Channel:
        return self.alice if name == "alice" else self.bob

    def collect(self, name: str) -> None:
        self.in_flight[name] += self.side(name).data_to_send()

    def deliver(self, sender: str, receiver: str, max_bytes: int | None = None) -> list[Event]:
        """Move up to max_bytes of sender's output to receiver and return its events."""
        self.collect(sender)
        pending = self.in_flight[sender]
        count = len(pending) if max_bytes is None else min(max_bytes, len(pending))
        chunk = bytes(pending[:count])
        del pending[:count]
        if chunk:
            self.side(receiver).receive_data(chunk)
        return drain(self.side(receiver))

    def handshake(self) -> None:
        self.deliver("alice", "bob")
        self.deliver("bob", "alice")
        self.deliver("alice", "bob")

    @classmethod
    def handshaken(cls, rng: Callable[[int], bytes] | None = None, **options: object) -> ChannelPair:
        pair = cls(rng, **options)  # type: ignore[arg-type]
        pair.handshake()
        return pair


def follow_transcript(reference: tuple[Any, Any], pair: tuple[Any, Any], payloads: list[bytes]) -> None:
    """Run a handshake twice in step, messages alternating from the initiator: `reference`
    (initiator, responder) writes each message, and `pair`, with the same keys and ephemeral
    rngs, must write the very same bytes and read each payload back."""
    for index, payload in enumerate(payloads):
        turn = index % 2
        expected = reference[turn].write_message(payload)
        assert reference[1 - turn].read_message(expected) == payload
        assert pair[turn].write_message(payload) == expected, f"message {index}"
        assert pair[1 - turn].read_message(expected) == payload
