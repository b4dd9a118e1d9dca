"""Device key files: created once, 0600, atomic, and refused when others can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshd.identity import (
    NOISE_KEY_FILE,
    SIGNING_KEY_FILE,
    KeyFileCorrupt,
    KeyFileUnprotected,
    fingerprint,
    load_or_create_identity,
)


def test_keys_are_created_once_with_private_modes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_identity(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in (SIGNING_KEY_FILE, NOISE_KEY_FILE):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    second = load_or_create_identity(state)
    assert second.device_id == first.device_id
    assert second.noise.public == first.noise.public
    assert sorted(p.name for p in state.iterdir()) == sorted([SIGNING_KEY_FILE, NOISE_KEY_FILE])


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    os.chmod(tmp_path / SIGNING_KEY_FILE, 0o644)
    with pytest.raises(KeyFileUnprotected, match="chmod 600"):
        load_or_create_identity(tmp_path)


def test_a_state_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    with pytest.raises(KeyFileUnprotected, match="writable by other users"):
        load_or_create_identity(tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"meshd ed25519 secret key v1\nAAAA\n"])
def test_a_corrupt_key_file_is_refused_without_showing_its_content(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / SIGNING_KEY_FILE
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileCorrupt) as error:
        load_or_create_identity(tmp_path)
    assert "AAAA" not in str(error.value)


def test_the_fingerprint_is_short_and_stable(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)
    assert identity.fingerprint == fingerprint(identity.device_id)
    parts = identity.fingerprint.split("-")
    assert [len(p) for p in parts] == [4, 4, 4, 4]
    assert fingerprint(bytes(32)) != fingerprint(bytes(31) + b"\x01")


def test_secrets_never_print(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)
    secrets = (bytes(identity.signing.seed), bytes(identity.noise.private))
    texts = [repr(identity), str(identity.noise.private), repr(identity.signing.seed),
             repr(identity.noise), repr(identity.signing)]
    for text in texts:
        for secret in secrets:
            assert secret.hex() not in text and repr(secret) not in text
    assert "<secret>" in repr(identity.noise.private)
