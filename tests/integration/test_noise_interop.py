"""Interop with an independent Noise implementation (the noiseprotocol package) over TCP.

The other side is written only from protocol/channel.md: 2-byte big-endian length frames,
Noise_XX_25519_ChaChaPoly_BLAKE2b with prologue b"meshd/1", then plaintexts of one kind byte
and a msgpack map. It runs in a thread on blocking sockets, sharing no code with meshd's
transport. (noiseprotocol drops the remote static key at Split and does not enforce the
65535-byte limit; the test works around the first and never relies on the second.)
"""

from __future__ import annotations

import socket
from typing import Any

import msgpack
import trio
from noise.connection import Keypair, NoiseConnection

from meshd.net.transport import PeerClosed, connect_secure, open_secure_connection
from meshd.protocol.crypto import DHKeyPair

from ..protocol.harness import seeded_rng

BIG = bytes(range(256)) * 400  # 102,400 bytes: crosses a fragment boundary


class ForeignPeer:
    """A minimal meshd channel peer built on noiseprotocol and blocking sockets."""

    def __init__(self, sock: socket.socket, *, initiator: bool, private: bytes) -> None:
        self.sock = sock
        self.noise = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_BLAKE2b")
        self.noise.set_prologue(b"meshd/1")
        self.noise.set_keypair_from_private_bytes(Keypair.STATIC, private)
        (self.noise.set_as_initiator if initiator else self.noise.set_as_responder)()
        self.remote_static = b""

    def _send_frame(self, data: bytes) -> None:
        assert len(data) <= 65535
        self.sock.sendall(len(data).to_bytes(2, "big") + data)

    def _receive_exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _receive_frame(self) -> bytes:
        return self._receive_exact(int.from_bytes(self._receive_exact(2), "big"))

    def handshake_as_initiator(self) -> None:
        self.noise.start_handshake()
        self._send_frame(self.noise.write_message(b""))
        self.noise.read_message(self._receive_frame())
        self.remote_static = self.noise.noise_protocol.handshake_state.rs.public_bytes
        self._send_frame(self.noise.write_message(b""))

    def handshake_as_responder(self) -> None:
        self.noise.start_handshake()
        self.noise.read_message(self._receive_frame())
        self._send_frame(self.noise.write_message(b""))
        self.noise.read_message(self._receive_frame())

    def send(self, message: dict[str, Any]) -> None:
        packed = msgpack.packb(message)
        pieces = [packed[i : i + 65518] for i in range(0, len(packed), 65518)]
        for index, piece in enumerate(pieces):
            kind = b"\x00" if index == len(pieces) - 1 else b"\x01"
            self._send_frame(self.noise.encrypt(kind + piece))

    def receive(self) -> dict[str, Any]:
        whole = b""
        while True:
            plaintext = self.noise.decrypt(self._receive_frame())
            kind, body = plaintext[0], plaintext[1:]
            if kind in (0, 1):
                whole += body
                if kind == 0:
                    return msgpack.unpackb(whole)
            # keepalives (2) are skipped; nothing else is expected in this test

    def close_with_reason(self, reason: str) -> None:
        self._send_frame(self.noise.encrypt(b"\x04" + reason.encode()))


async def test_meshd_initiator_with_a_foreign_responder() -> None:
    rng = seeded_rng(11)
    ours, theirs = DHKeyPair.generate(rng), DHKeyPair.generate(rng)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    result: dict[str, Any] = {}

    def foreign_side() -> None:
        conn, _ = server.accept()
        with conn:
            peer = ForeignPeer(conn, initiator=False, private=bytes(theirs.private))
            peer.handshake_as_responder()
            result["hash"] = peer.noise.get_handshake_hash()
            result["first"] = peer.receive()
            result["big"] = peer.receive()
            peer.send({"t": "test.reply", "echo": result["first"]["n"] + 1, "big": BIG})
            peer.close_with_reason("done")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, foreign_side)
        connection = await connect_secure(
            "127.0.0.1", port, static=ours, authorize=lambda key: key == theirs.public
        )
        async with connection:
            await connection.send({"t": "test.hello", "n": 41})
            await connection.send({"t": "test.big", "big": BIG})
            reply = await connection.receive()
            assert reply == {"t": "test.reply", "echo": 42, "big": BIG}
            try:
                await connection.receive()
                raise AssertionError("expected the foreign peer to close")
            except PeerClosed as closed:
                assert closed.reason == "done"
    server.close()
    assert result["hash"] == connection.handshake_hash
    assert result["first"] == {"t": "test.hello", "n": 41}
    assert result["big"]["big"] == BIG


async def test_foreign_initiator_with_a_meshd_responder() -> None:
    rng = seeded_rng(12)
    ours, theirs = DHKeyPair.generate(rng), DHKeyPair.generate(rng)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    result: dict[str, Any] = {}

    def foreign_side() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            peer = ForeignPeer(sock, initiator=True, private=bytes(theirs.private))
            peer.handshake_as_initiator()
            result["remote_static"] = peer.remote_static
            result["hash"] = peer.noise.get_handshake_hash()
            peer.send({"t": "test.hello", "big": BIG})
            result["reply"] = peer.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, foreign_side)
        stream = await listeners[0].accept()
        connection = await open_secure_connection(
            stream, initiator=False, static=ours, authorize=lambda key: key == theirs.public
        )
        async with connection:
            hello = await connection.receive()
            assert hello == {"t": "test.hello", "big": BIG}
            await connection.send({"t": "test.reply", "size": len(hello["big"])})
            assert connection.remote_static == theirs.public
            handshake_hash = connection.handshake_hash
    await listeners[0].aclose()
    assert result["remote_static"] == ours.public
    assert result["hash"] == handshake_hash
    assert result["reply"] == {"t": "test.reply", "size": len(BIG)}
