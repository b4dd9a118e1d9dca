"""A device's long-term keys, kept in 0600 files in its state directory.

A device has an Ed25519 signing key (its identity: the device id is the public key) and an
X25519 key (its Noise static key). Both are created on first start, written atomically
(a temporary file opened O_EXCL with mode 0600, fsynced, renamed, the directory fsynced),
and refused afterwards if another user could read them, as ssh refuses an unprotected key.
The relay keeps its single X25519 key the same way.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .protocol.crypto import (
    DHKeyPair,
    PublicKey,
    RandomSource,
    SigningKeyPair,
    blake2b_256,
)

SIGNING_KEY_FILE = "device.ed25519"
NOISE_KEY_FILE = "device.x25519"
_HEADERS = {"ed25519": "meshd ed25519 secret key v1", "x25519": "meshd x25519 secret key v1",
            "enrolment": "meshd relay enrolment token v1"}


class KeyFileError(Exception):
    """A key file cannot be used; the message says which file and what to do."""


class KeyFileUnprotected(KeyFileError):
    pass


class KeyFileCorrupt(KeyFileError):
    pass


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    signing: SigningKeyPair
    noise: DHKeyPair

    @property
    def device_id(self) -> PublicKey:
        return self.signing.public

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.signing.public)


def fingerprint(sign_key: bytes) -> str:
    """A short, readable digest of a device id for display: 'abcd-efgh-ijkl-mnop'."""
    text = base64.b32encode(blake2b_256(b"meshd fingerprint\0" + sign_key)[:10]).decode().lower()
    return "-".join(text[i : i + 4] for i in range(0, 16, 4))


def ensure_private_dir(path: Path) -> None:
    """Create the state directory 0700 if missing; refuse one others can write to."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode
    if mode & 0o022:
        raise KeyFileUnprotected(
            f"state directory {path} is writable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod go-w {path}"
        )


def load_or_create_key(path: Path, kind: str, rng: RandomSource = os.urandom) -> bytes:
    """The 32 secret bytes in path, created atomically (0600) on first use. Processes that
    start together on one path (several relay processes sharing a key) all get the one key
    the first of them wrote."""
    if path.exists():
        return _read_key(path, kind)
    secret = rng(32)
    try:
        _write_atomically(path, f"{_HEADERS[kind]}\n{base64.b64encode(secret).decode()}\n".encode(),
                          replace=False)
    except FileExistsError:
        return _read_key(path, kind)  # another process created it first: use that one
    return secret


def load_or_create_identity(state_dir: Path, rng: RandomSource = os.urandom) -> DeviceIdentity:
    ensure_private_dir(state_dir)
    signing_seed = load_or_create_key(state_dir / SIGNING_KEY_FILE, "ed25519", rng)
    noise_secret = load_or_create_key(state_dir / NOISE_KEY_FILE, "x25519", rng)
    return DeviceIdentity(SigningKeyPair(signing_seed), DHKeyPair.from_private_bytes(noise_secret))


def _read_key(path: Path, kind: str) -> bytes:
    info = path.stat()
    if info.st_mode & 0o077:
        raise KeyFileUnprotected(
            f"key file {path} can be read by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"meshd refuses it. Run: chmod 600 {path}"
        )
    if info.st_uid != os.geteuid():
        raise KeyFileUnprotected(f"key file {path} belongs to uid {info.st_uid}, not to this user")
    lines = path.read_bytes().decode("ascii", "replace").split("\n")
    try:
        if lines[0] != _HEADERS[kind]:
            raise ValueError("unexpected header")
        secret = base64.b64decode(lines[1], validate=True)
        if len(secret) != 32:
            raise ValueError("wrong length")
    except (IndexError, ValueError) as err:
        raise KeyFileCorrupt(f"key file {path} is not a meshd {kind} key ({err})") from None
    return secret


def _write_atomically(path: Path, content: bytes, *, replace: bool = True) -> None:
    """Write content to path through a temporary file of this process's own; replace=False
    raises FileExistsError when path exists (then nothing is written)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        temporary.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if it exists, unlike rename
    finally:
        if not replace:
            temporary.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
