"""bench/channel.py's figure 1: handshakes per CPU-second, both sides in one process.

meshd's Channel running Noise_XX (XXHandshake) and Noise_XXpsk0 (MemberHandshake, what daemons
run), the X25519 work of a handshake alone (the ceiling of any ratio against the baseline), and
the noiseprotocol package's NoiseConnection (the baseline). Each returns handshakes per second of
this process's CPU time: on a shared machine wall time also counts the time other processes
held the core.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.protocol.channel import NEED_DATA, Channel, XXHandshake  # noqa: E402
from meshd.protocol.crypto import DHKeyPair  # noqa: E402
from meshd.protocol.memberhandshake import MemberHandshake  # noqa: E402


def meshd_handshakes(count: int) -> float:
    alice_key, bob_key = DHKeyPair.generate(os.urandom), DHKeyPair.generate(os.urandom)
    accept = lambda key: True  # noqa: E731
    start = time.process_time()
    for _ in range(count):
        alice = Channel(XXHandshake(initiator=True, static=alice_key, rng=os.urandom,
                                    authorize=accept), now=0.0)
        bob = Channel(XXHandshake(initiator=False, static=bob_key, rng=os.urandom,
                                  authorize=accept), now=0.0)
        for sender, receiver in ((alice, bob), (bob, alice), (alice, bob)):
            receiver.receive_data(sender.data_to_send())
            while receiver.next_event() is not NEED_DATA:
                pass
    return count / (time.process_time() - start)


def member_handshakes(count: int) -> float:
    """meshd_handshakes for the handshake daemons run with each other (memberhandshake.py:
    Noise_XXpsk0 keyed by the circle's epoch)."""
    alice_key, bob_key, psk = DHKeyPair.generate(os.urandom), DHKeyPair.generate(os.urandom), os.urandom(32)
    accept = lambda key: True  # noqa: E731
    start = time.process_time()
    for _ in range(count):
        alice = Channel(MemberHandshake(initiator=True, static=alice_key, rng=os.urandom,
                                        authorize=accept, psks=[psk]), now=0.0)
        bob = Channel(MemberHandshake(initiator=False, static=bob_key, rng=os.urandom,
                                      authorize=accept, psks=[psk]), now=0.0)
        for sender, receiver in ((alice, bob), (bob, alice), (alice, bob)):
            receiver.receive_data(sender.data_to_send())
            while receiver.next_event() is not NEED_DATA:
                pass
    return count / (time.process_time() - start)


def x25519_only_handshakes(count: int) -> float:
    """The X25519 work of meshd's XX handshakes alone (both sides: two ephemeral key pairs,
    six DHs), per second: the ceiling of meshd_handshakes whatever the rest costs."""
    alice_key, bob_key = DHKeyPair.generate(os.urandom), DHKeyPair.generate(os.urandom)
    start = time.process_time()
    for _ in range(count):
        alice_e, bob_e = DHKeyPair.generate(os.urandom), DHKeyPair.generate(os.urandom)
        alice_e.dh(bob_e.public), bob_e.dh(alice_e.public)  # ee
        alice_e.dh(bob_key.public), bob_key.dh(alice_e.public)  # es
        alice_key.dh(bob_e.public), bob_e.dh(alice_key.public)  # se
    return count / (time.process_time() - start)


def noiseprotocol_handshakes(count: int, pattern: str = "XX") -> float:
    from noise.connection import Keypair, NoiseConnection

    alice_private, bob_private, psk = os.urandom(32), os.urandom(32), os.urandom(32)
    name = f"Noise_{pattern}_25519_ChaChaPoly_BLAKE2b".encode()
    start = time.process_time()
    for _ in range(count):
        alice = NoiseConnection.from_name(name)
        bob = NoiseConnection.from_name(name)
        for side, private in ((alice, alice_private), (bob, bob_private)):
            side.set_prologue(b"meshd/1")
            side.set_keypair_from_private_bytes(Keypair.STATIC, private)
            if pattern != "XX":
                side.set_psks(psk=psk)
        alice.set_as_initiator()
        bob.set_as_responder()
        alice.start_handshake()
        bob.start_handshake()
        bob.read_message(alice.write_message(b""))
        alice.read_message(bob.write_message(b""))
        bob.read_message(alice.write_message(b""))
    return count / (time.process_time() - start)
