"""Strangers learn nothing at the device port (protocol/channel.md, "The device port").

The stranger is an independent Noise implementation (the noiseprotocol package) on a
blocking socket, written from the spec: it speaks plain Noise_XX (as meshd's port spoke
before) or Noise_XXpsk0 with a PSK it made up, and records every byte the device sends.
A real daemon of a paired circle listens; its static key is read from its state directory.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import trio
from noise.connection import Keypair, NoiseConnection

from meshd.identity import load_or_create_identity
from meshd.net.transport import open_secure_connection
from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.memberhandshake import MemberHandshake, NotACircleMember

from ..protocol.harness import seeded_rng
from .daemons import CONVERGE_S, DaemonProcess, form_circle, pair, wait_connected


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _stranger_knocks(port: int, pattern: bytes, psk: bytes | None) -> tuple[bytes, bytes]:
    """Send message 1 as a stranger: (every byte the device sent before closing, the static
    key the stranger could read from it: message 2 of plain XX hands it over)."""
    noise = NoiseConnection.from_name(pattern)
    noise.set_prologue(b"meshd/1")
    noise.set_keypair_from_private_bytes(Keypair.STATIC, os.urandom(32))
    if psk is not None:
        noise.set_psks(psk)
    noise.set_as_initiator()
    noise.start_handshake()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(_frame(noise.write_message(b"")))
        while chunk := sock.recv(4096):
            received += chunk
            if len(received) >= 2 and len(received) >= 2 + int.from_bytes(received[:2], "big"):
                break  # a whole message 2: enough to see what a stranger learns
    learned = b""
    if len(received) >= 2:
        try:
            noise.read_message(received[2:2 + int.from_bytes(received[:2], "big")])
            learned = noise.noise_protocol.handshake_state.rs.public_bytes
        except Exception:  # noqa: BLE001 - whatever the library raises: it learned nothing
            learned = b""
    return received, learned


async def test_a_stranger_gets_not_one_byte_from_the_device_port(tmp_path) -> None:  # noqa: ANN001
    alpha, beta = DaemonProcess(tmp_path, "alpha"), DaemonProcess(tmp_path, "beta")
    try:
        await form_circle([alpha, beta])
        port = int((await alpha.status())["listen"][0].rsplit(":", 1)[1])
        static = bytes(load_or_create_identity(alpha.state_dir).noise.public)
        seen: dict[str, tuple[bytes, bytes]] = {}
        for name, pattern, psk in (
            ("plain XX", b"Noise_XX_25519_ChaChaPoly_BLAKE2b", None),
            ("XXpsk0, made-up PSK", b"Noise_XXpsk0_25519_ChaChaPoly_BLAKE2b", os.urandom(32)),
        ):
            seen[name] = await trio.to_thread.run_sync(_stranger_knocks, port, pattern, psk)
        static_bytes_seen = sum(len(learned) for _, learned in seen.values() if learned == static)
        assert static_bytes_seen == 0, "a stranger read the device's static key"
        assert {n: len(r) for n, (r, _) in seen.items()} == dict.fromkeys(seen, 0), "not one byte"
        # The members still talk to each other (their handshakes use the circle's PSK).
        await alpha.write("chat", "members only")
        assert (await alpha.status())["peers_connected"] == 1
    finally:
        alpha.kill()
        beta.kill()


async def test_the_member_handshake_interoperates_with_noiseprotocol() -> None:
    rng = seeded_rng(21)
    ours, theirs = DHKeyPair.generate(rng), DHKeyPair.generate(rng)
    previous, current = rng(32), rng(32)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    result: dict[str, Any] = {}

    def member_behind(psk: bytes) -> None:
        """A member that only knows the previous epoch: the responder accepts it."""
        noise = NoiseConnection.from_name(b"Noise_XXpsk0_25519_ChaChaPoly_BLAKE2b")
        noise.set_prologue(b"meshd/1")
        noise.set_keypair_from_private_bytes(Keypair.STATIC, bytes(theirs.private))
        noise.set_psks(psk)
        noise.set_as_initiator()
        noise.start_handshake()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(_frame(noise.write_message(b"")))
            length = int.from_bytes(sock.recv(2, socket.MSG_WAITALL), "big")
            noise.read_message(sock.recv(length, socket.MSG_WAITALL))
            result["remote_static"] = noise.noise_protocol.handshake_state.rs.public_bytes
            sock.sendall(_frame(noise.write_message(b"")))
            result["hash"] = noise.get_handshake_hash()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, member_behind, previous)
        stream = await listeners[0].accept()
        phase = MemberHandshake(initiator=False, static=ours, rng=rng,
                                authorize=lambda key: key == theirs.public, psks=[current, previous])
        connection = await open_secure_connection(stream, initiator=False, static=ours,
                                                  authorize=lambda key: True, handshake=phase)
        assert phase.psk_index == 1 and connection.remote_static == theirs.public
        handshake_hash = connection.handshake_hash
        await connection.aclose()
    assert result["remote_static"] == bytes(ours.public) and result["hash"] == handshake_hash

    # A made-up PSK: the responder raises and sends nothing at all.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: trio.to_thread.run_sync(
            lambda: result.__setitem__("stranger", _stranger_knocks(
                port, b"Noise_XXpsk0_25519_ChaChaPoly_BLAKE2b", os.urandom(32))[0])))
        stream = await listeners[0].accept()
        phase = MemberHandshake(initiator=False, static=ours, rng=rng,
                                authorize=lambda key: True, psks=[current, previous])
        try:
            await open_secure_connection(stream, initiator=False, static=ours,
                                         authorize=lambda key: True, handshake=phase)
            raise AssertionError("a stranger's message 1 was accepted")
        except NotACircleMember:
            pass
    await listeners[0].aclose()
    assert result["stranger"] == b""


async def test_a_device_that_slept_through_two_epochs_still_gets_in(tmp_path) -> None:  # noqa: ANN001
    alpha, beta = DaemonProcess(tmp_path, "alpha"), DaemonProcess(tmp_path, "beta")
    delta = DaemonProcess(tmp_path, "delta")
    try:
        await form_circle([alpha, beta])
        assert await beta.stop() == 0
        # Two epochs beta does not know: delta is added (an epoch), then removed (another).
        await delta.start()
        await pair(alpha, delta)
        delta_id = (await delta.status())["device"]
        await alpha.request("POST", f"/v1/devices/{delta_id[:16]}/remove")
        delta.kill()
        assert (await alpha.status())["epoch"] >= 4
        beta.reconfigure(peers=(await alpha.status())["listen"], discovery=False)
        await beta.start()
        await wait_connected(beta, 1)

        async def learnt() -> bool:
            status = await beta.status()
            return status["epoch"] == (await alpha.status())["epoch"] and status["devices"] == 2

        await beta.until(learnt, CONVERGE_S, "beta to learn the epochs it slept through")
    finally:
        for daemon in (alpha, beta, delta):
            daemon.kill()
