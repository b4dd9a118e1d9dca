"""What devices put in a relay: sealed envelopes, sealed backups, and the checks on them.

The relay is trusted with nothing but storage. An envelope is sealed (XChaCha20-Poly1305)
under the epoch's mailbox key and bound to its mailbox id and epoch (the AEAD's associated
data), and its plaintext is signed by the sending member, so the relay can neither read,
forge, alter nor move one. A per-(sender, recipient) sequence number lets the recipient's
SequenceTracker notice what the relay dropped, replayed or reordered. A backup blob is
sealed under the epoch's backup key with its version signed inside, so a relay serving an
older one is caught by RollbackGuard. protocol/relay.md gives the exact layouts.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from .crypto import (
    KEY_LEN,
    SIGNATURE_LEN,
    XAEAD_NONCE_LEN,
    RandomSource,
    SigningKeyPair,
    derive_key,
    signature_is_valid,
    xaead_decrypt,
    xaead_encrypt,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .relay import MAILBOX_ID_BYTES
from .schema import Anything, Bin, Int, MapOf, SchemaError, Text, Tuple, unpack

if TYPE_CHECKING:
    from .circle import EpochKeys

FORMAT_VERSION = 1
HEADER_BYTES = 1 + 4 + XAEAD_NONCE_LEN  # version, epoch (u32 BE), nonce
MAILBOX_ID_LABEL = b"meshd-mailbox-id"
ENVELOPE_AD = b"meshd/envelope/1\x00"
ENVELOPE_SIGNATURE_CONTEXT = b"meshd/envelope-signature/1\x00"
BACKUP_AD = b"meshd/backup/1\x00"
BACKUP_SIGNATURE_CONTEXT = b"meshd/backup-signature/1\x00"
MAX_EPOCH = 2**32 - 1
MAX_SEQ = 2**63 - 1
# A tracker remembers at most this many out-of-order arrivals per sender; past that, the
# oldest holes are declared lost (a hostile sender must not grow our state without bound).
MAX_AHEAD_PER_SENDER = 4096

EpochKeysFor = Callable[[int], "EpochKeys | None"]


class EnvelopeRejected(RemoteProtocolError):
    """An envelope or backup that does not open. reason: malformed, unknown-epoch, bad-mac,
    bad-signature, unknown-sender, version-mismatch."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class EnvelopeReplayed(RemoteProtocolError):
    """An envelope whose sequence number was already delivered (a replay or a duplicate)."""

    reason = "replay"

    def __init__(self, sender: bytes, seq: int) -> None:
        super().__init__(f"envelope {seq} from this sender was already delivered")
        self.sender = sender
        self.seq = seq


class RollbackDetected(RemoteProtocolError):
    """The relay served a backup older than one this device has already seen."""

    reason = "rollback"

    def __init__(self, version: int, highest_seen: int) -> None:
        super().__init__(f"backup version {version} is older than version {highest_seen} already seen")
        self.version = version
        self.highest_seen = highest_seen


def mailbox_id(keys: EpochKeys, recipient_sign_key: bytes) -> bytes:
    """The recipient's mailbox in this epoch: the relay sees this id, never the key."""
    return derive_key(keys.mailbox_id_key, MAILBOX_ID_LABEL, recipient_sign_key, MAILBOX_ID_BYTES)


# ---- Envelopes -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Letter:
    """An opened envelope: who sent it, its sequence number, its epoch and its payload."""

    sender: bytes
    seq: int
    epoch: int
    payload: dict[str, Any]


def seal_envelope(
    *,
    keys: EpochKeys,
    mailbox: bytes,
    signer: SigningKeyPair,
    seq: int,
    payload: dict[str, Any],
    rng: RandomSource,
) -> bytes:
    """Seal payload for the mailbox's owner. seq counts from 1 per (sender, recipient)."""
    if not 1 <= seq <= MAX_SEQ:
        raise LocalProtocolError("envelope seq must be 1..2**63-1")
    body = _pack(payload)
    signature = signer.sign(_envelope_signed_bytes(mailbox, keys.number, seq, body))
    plaintext = _pack([bytes(signer.public), seq, body, signature])
    return _seal(keys.mailbox, keys.number, _envelope_ad(mailbox, keys.number), plaintext, rng)


def open_envelope(
    envelope: bytes,
    *,
    mailbox: bytes,
    keys_for_epoch: EpochKeysFor,
    is_sender_allowed: Callable[[bytes], bool],
) -> Letter:
    """Open and verify one envelope fetched from mailbox. Raises EnvelopeRejected."""
    epoch = _epoch_of(envelope)
    keys = keys_for_epoch(epoch)
    if keys is None:
        raise EnvelopeRejected("unknown-epoch", f"no key for epoch {epoch}")
    plaintext = _open(keys.mailbox, envelope, _envelope_ad(mailbox, epoch))
    sender, seq, body, signature = _fields(plaintext, "envelope")
    if not 1 <= seq <= MAX_SEQ:
        raise EnvelopeRejected("malformed", "envelope seq out of range")
    if not is_sender_allowed(sender):
        raise EnvelopeRejected("unknown-sender", "envelope from a key that is not a member")
    if not signature_is_valid(sender, _envelope_signed_bytes(mailbox, epoch, seq, body), signature):
        raise EnvelopeRejected("bad-signature", "envelope signature does not verify")
    return Letter(sender, seq, epoch, _unpack_map(body))


def _envelope_ad(mailbox: bytes, epoch: int) -> bytes:
    if len(mailbox) != MAILBOX_ID_BYTES:
        raise LocalProtocolError("mailbox id must be 32 bytes")
    return ENVELOPE_AD + mailbox + epoch.to_bytes(4, "big")


def _envelope_signed_bytes(mailbox: bytes, epoch: int, seq: int, body: bytes) -> bytes:
    return ENVELOPE_SIGNATURE_CONTEXT + _pack([mailbox, epoch, seq, body])


# ---- Backups -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backup:
    version: int
    epoch: int
    signer: bytes
    snapshot: dict[str, Any]


def seal_backup(
    *,
    keys: EpochKeys,
    circle_id: bytes,
    signer: SigningKeyPair,
    version: int,
    snapshot: dict[str, Any],
    rng: RandomSource,
) -> bytes:
    """Seal a snapshot of the circle (records, log entries) as backup `version` (>= 1)."""
    if not 1 <= version <= MAX_SEQ:
        raise LocalProtocolError("backup version must be 1..2**63-1")
    body = _pack(snapshot)
    signature = signer.sign(_backup_signed_bytes(circle_id, keys.number, version, body))
    plaintext = _pack([bytes(signer.public), version, body, signature])
    return _seal(keys.backup, keys.number, BACKUP_AD + circle_id + keys.number.to_bytes(4, "big"),
                 plaintext, rng)


def open_backup(
    blob: bytes,
    *,
    circle_id: bytes,
    version: int,
    keys_for_epoch: EpochKeysFor,
    is_signer_allowed: Callable[[bytes], bool],
) -> Backup:
    """Open a backup the relay says is `version`; the signed version inside must match."""
    epoch = _epoch_of(blob)
    keys = keys_for_epoch(epoch)
    if keys is None:
        raise EnvelopeRejected("unknown-epoch", f"no key for epoch {epoch}")
    plaintext = _open(keys.backup, blob, BACKUP_AD + circle_id + epoch.to_bytes(4, "big"))
    signer, inner_version, body, signature = _fields(plaintext, "backup")
    if not is_signer_allowed(signer):
        raise EnvelopeRejected("unknown-sender", "backup signed by a key that is not a member")
    if not signature_is_valid(signer, _backup_signed_bytes(circle_id, epoch, inner_version, body),
                              signature):
        raise EnvelopeRejected("bad-signature", "backup signature does not verify")
    if inner_version != version:
        raise EnvelopeRejected("version-mismatch",
                               f"relay says version {version}, the backup says {inner_version}")
    return Backup(inner_version, epoch, signer, _unpack_map(body))


def _backup_signed_bytes(circle_id: bytes, epoch: int, version: int, body: bytes) -> bytes:
    return BACKUP_SIGNATURE_CONTEXT + _pack([circle_id, epoch, version, body])


class RollbackGuard:
    """The highest backup version this device has seen (persist it); refuses anything older."""

    def __init__(self, highest_seen: int = 0) -> None:
        self.highest_seen = highest_seen

    def check(self, version: int) -> None:
        """Raise RollbackDetected for a version below the highest seen; else remember it."""
        if version < self.highest_seen:
            raise RollbackDetected(version, self.highest_seen)
        self.highest_seen = version


# ---- Sequence tracking ---------------------------------------------------------------


class Arrival(enum.Enum):
    IN_ORDER = "in-order"  # the next expected seq
    AHEAD = "ahead"  # beyond the next expected: earlier ones are missing (dropped or late)
    LATE = "late"  # fills a hole left earlier: it arrived out of order


class SequenceTracker:
    """Per sender: everything delivered through `through`, plus the seqs seen beyond it.

    accept() classifies each arrival and raises EnvelopeReplayed for one already delivered;
    missing() lists the holes (envelopes the relay dropped, or that are still to come).
    """

    def __init__(self, state: Mapping[bytes, tuple[int, list[int]]] | None = None) -> None:
        self._through: dict[bytes, int] = {}
        self._ahead: dict[bytes, set[int]] = {}
        self.lost: dict[bytes, int] = {}  # holes given up on after MAX_AHEAD_PER_SENDER
        for sender, (through, ahead) in (state or {}).items():
            self._through[sender] = through
            if ahead:
                self._ahead[sender] = set(ahead)

    def accept(self, sender: bytes, seq: int) -> Arrival:
        through = self._through.get(sender, 0)
        ahead = self._ahead.get(sender)
        if seq <= through or (ahead is not None and seq in ahead):
            raise EnvelopeReplayed(sender, seq)
        if seq == through + 1:
            late = bool(ahead)
            through = seq
            while ahead and through + 1 in ahead:
                through += 1
                ahead.discard(through)
            self._through[sender] = through
            if ahead is not None and not ahead:
                del self._ahead[sender]
            return Arrival.LATE if late else Arrival.IN_ORDER
        ahead = self._ahead.setdefault(sender, set())
        late = any(s > seq for s in ahead)
        ahead.add(seq)
        if len(ahead) > MAX_AHEAD_PER_SENDER:
            self._give_up_lowest_hole(sender)
        return Arrival.LATE if late else Arrival.AHEAD

    def missing(self, sender: bytes) -> list[tuple[int, int]]:
        """Inclusive ranges of seqs not yet delivered below the highest one seen."""
        ahead = sorted(self._ahead.get(sender, ()))
        holes: list[tuple[int, int]] = []
        previous = self._through.get(sender, 0)
        for seq in ahead:
            if seq > previous + 1:
                holes.append((previous + 1, seq - 1))
            previous = seq
        return holes

    def healed(self, sender: bytes, seq: int) -> None:
        """What the holes below seq held arrived another way (the sender deposited it again
        under new seqs, told this device's vector): stop waiting for those envelopes. One
        that still comes later is then a replay, and what it holds is here already."""
        ahead = self._ahead.get(sender)
        if not ahead:
            return
        below = [s for s in ahead if s <= seq]
        if not below:
            return
        through = max(self._through.get(sender, 0), max(below))
        ahead.difference_update(below)
        while through + 1 in ahead:
            through += 1
            ahead.discard(through)
        self._through[sender] = through
        if not ahead:
            del self._ahead[sender]

    def delivered_through(self, sender: bytes) -> int:
        return self._through.get(sender, 0)

    def state(self) -> dict[bytes, tuple[int, list[int]]]:
        """Everything to persist, for SequenceTracker(state) after a restart."""
        return {s: (t, sorted(self._ahead.get(s, ()))) for s, t in self._through.items()} | {
            s: (0, sorted(a)) for s, a in self._ahead.items() if s not in self._through
        }

    def _give_up_lowest_hole(self, sender: bytes) -> None:
        ahead = self._ahead[sender]
        lowest = min(ahead)
        through = self._through.get(sender, 0)
        self.lost[sender] = self.lost.get(sender, 0) + (lowest - 1 - through)
        through = lowest
        ahead.discard(lowest)
        while through + 1 in ahead:
            through += 1
            ahead.discard(through)
        self._through[sender] = through


# ---- Shared sealing ------------------------------------------------------------------


def _pack(value: Any) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as err:
        raise LocalProtocolError(f"cannot encode: {err}") from err
    return packed


def _seal(key: bytes, epoch: int, ad: bytes, plaintext: bytes, rng: RandomSource) -> bytes:
    if not 0 <= epoch <= MAX_EPOCH or len(key) != KEY_LEN:
        raise LocalProtocolError("invalid epoch number or key")
    nonce = rng(XAEAD_NONCE_LEN)
    header = bytes((FORMAT_VERSION,)) + epoch.to_bytes(4, "big") + nonce
    return header + xaead_encrypt(key, nonce, ad, plaintext)


def _epoch_of(data: bytes) -> int:
    if not isinstance(data, bytes) or len(data) < HEADER_BYTES + 16:
        raise EnvelopeRejected("malformed", "too short")
    if data[0] != FORMAT_VERSION:
        raise EnvelopeRejected("malformed", f"unknown format version {data[0]}")
    return int.from_bytes(data[1:5], "big")


def _open(key: bytes, data: bytes, ad: bytes) -> bytes:
    nonce = data[5:HEADER_BYTES]
    try:
        return xaead_decrypt(key, nonce, ad, data[HEADER_BYTES:])
    except RemoteProtocolError as err:
        raise EnvelopeRejected("bad-mac", "does not authenticate (tampered, moved or not ours)") from err


# protocol/relay.md, "Envelope" and "Backup blob": the plaintext inside the AEAD, and the
# payload it signs (a map, e.g. a log.entries batch, checked by its own schema later).
PLAINTEXT_SCHEMA = Tuple(Bin(exact=KEY_LEN), Int(0, 2**64 - 1), Bin(), Bin(exact=SIGNATURE_LEN))
PAYLOAD_SCHEMA = MapOf(Text(1, 64), Anything(), 64)


def _fields(plaintext: bytes, what: str) -> tuple[bytes, int, bytes, bytes]:
    try:
        fields = unpack(plaintext, PLAINTEXT_SCHEMA, max_bytes=len(plaintext))
    except SchemaError as err:
        raise EnvelopeRejected("malformed", f"{what} plaintext: {err}") from err
    return fields[0], fields[1], fields[2], fields[3]


def _unpack_map(body: bytes) -> dict[str, Any]:
    try:
        value: dict[str, Any] = unpack(body, PAYLOAD_SCHEMA, max_bytes=len(body))
    except SchemaError as err:
        raise EnvelopeRejected("malformed", f"payload: {err}") from err
    return value
