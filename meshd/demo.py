"""`make demo`: a real demonstration on this machine, printing each step with its timing.

Stage 1 (the secure channel): two processes on loopback, each with its own keys in a
temporary state directory, complete a Noise_XX handshake and exchange messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from .identity import load_or_create_identity
from .protocol.crypto import PublicKey, short_key
from .transport import connect_secure, open_secure_connection

START = time.perf_counter()


def step(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.3f}s] {text}", flush=True)


async def responder(state_dir: Path) -> None:
    """The second process: listen on loopback, answer whoever holds the expected key."""
    identity = load_or_create_identity(state_dir)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    print(f"{port} {identity.noise.public.hex()}", flush=True)
    expected = PublicKey(bytes.fromhex((await trio.to_thread.run_sync(sys.stdin.readline)).strip()))
    stream = await listeners[0].accept()
    connection = await open_secure_connection(
        stream, initiator=False, static=identity.noise, authorize=lambda key: key == expected
    )
    async with connection:
        async for message in connection:
            await connection.send({"t": "demo.reply", "text": f"got {message['text']!r}"})


async def initiator() -> None:
    with tempfile.TemporaryDirectory(prefix="meshd-demo-") as tmp:
        state_a, state_b = Path(tmp) / "laptop", Path(tmp) / "desktop"
        laptop = load_or_create_identity(state_a)
        step(f"laptop: created keys in {state_a} (fingerprint {laptop.fingerprint})")
        process = subprocess.Popen(
            [sys.executable, "-m", "meshd.demo", "--responder", str(state_b)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert process.stdin and process.stdout
            port_text, desktop_key_hex = (await trio.to_thread.run_sync(process.stdout.readline)).split()
            process.stdin.write(laptop.noise.public.hex() + "\n")
            process.stdin.flush()
            desktop_key = PublicKey(bytes.fromhex(desktop_key_hex))
            step(f"desktop: a second process (pid {process.pid}) listening on 127.0.0.1:{port_text}, "
                 f"static key {short_key(desktop_key)}")
            connection = await connect_secure(
                "127.0.0.1", int(port_text), static=laptop.noise,
                authorize=lambda key: key == desktop_key,
            )
            step("laptop -> desktop: Noise_XX handshake complete, both keys authenticated "
                 f"(handshake hash {connection.handshake_hash[:8].hex()}…)")
            async with connection:
                for text in ("hello from the laptop", "a second message", "x" * 100_000):
                    sent = time.perf_counter()
                    await connection.send({"t": "demo.text", "text": text})
                    reply = await connection.receive()
                    shown = text if len(text) < 40 else f"{len(text):,} bytes (fragmented)"
                    step(f"laptop sent {shown!r}; desktop replied {reply['text'][:40]!r}… "
                         f"in {1000 * (time.perf_counter() - sent):.1f} ms")
        finally:
            process.wait(timeout=10)
        step(f"desktop process exited with status {process.returncode}; temporary keys removed")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--responder":
        trio.run(responder, Path(sys.argv[2]))
        return
    print("meshd demo, stage 1: the secure channel between two processes on loopback\n")
    trio.run(initiator)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
