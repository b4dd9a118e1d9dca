"""The circle: signed membership records, the operations that sign new ones, and the keys.

Circle is the validated record DAG (circledag.py: validity, merging, the state the merge
rule of mergerule.py implies) plus what a device does with it: found a circle, add and
remove devices, rotate the epoch, enrol and use the recovery member, settle a dispute with
the recovery words (each operation returns the new encoded records, already merged), and
read the epoch keys sealed to it (epochs.py: an epoch is the record that made it).

The rules, and why they are order independent, are spelled out in protocol/circle.md.
Time and randomness are arguments.
"""

from __future__ import annotations

from typing import Any

from . import epochs
from .circledag import CircleDag, CircleState
from .crypto import KEY_LEN, DHKeyPair, RandomSource, SigningKeyPair, seal
from .cutoff import cutoff_from_wire, cutoff_wire
from .entry import Head
from .epochs import EpochKeys, epoch_keys
from .records import (
    ADD,
    EPOCH,
    GENESIS,
    GENESIS_NONCE_BYTES,
    MAX_EPOCH_NUMBER,
    RECOVERY,
    REMOVE,
    CircleOperationError,
    DeviceInfo,
    Record,
    RecordRejected,
)

__all__ = ["Circle", "CircleState", "EpochKeys", "epoch_keys"]  # EpochKeys: re-exported


class Circle(CircleDag):
    """A validated set of records plus the derived state, and the local operations."""

    # -- construction

    @classmethod
    def create(cls, signer: SigningKeyPair, device: DeviceInfo, rng: RandomSource) -> Circle:
        """A new circle: genesis enrolling device, then epoch 1 sealed to it."""
        if device.recovery:
            raise CircleOperationError("a circle is founded by a device, not a recovery key")
        if bytes(signer.public) != bytes(device.sign_key):
            raise CircleOperationError("the founding device signs the genesis record itself")
        body = {"device": device.claim(signer), "nonce": rng(GENESIS_NONCE_BYTES)}
        genesis = Record.sign(signer, b"", GENESIS, (), body)
        circle = cls(genesis)
        circle.rotate_epoch(signer, rng)
        return circle

    # -- local operations: each returns the new encoded records, already merged

    def _epoch_body(self, rng: RandomSource, *, without: bytes | None = None) -> dict[str, Any]:
        number = self._current.max_epoch + 1
        if number > MAX_EPOCH_NUMBER:
            raise CircleOperationError("epoch numbers are exhausted")
        epoch_key = rng(KEY_LEN)
        recipients = sorted(
            info.dh_key for key, info in self._state.members.items() if key != without
        )
        return {"boxes": [[dh, seal(dh, epoch_key)] for dh in recipients], "epoch": number}

    def add_device(self, signer: SigningKeyPair, device: DeviceInfo, rng: RandomSource) -> list[bytes]:
        """Add a device (it must carry its claim), then a new epoch it can read."""
        self._member_signer(signer)
        if device.recovery:
            raise CircleOperationError("enrol a recovery key with enrol_recovery")
        return self._enrol(signer, ADD, device, rng)

    def _enrol(self, signer: SigningKeyPair, kind: str, device: DeviceInfo, rng: RandomSource) -> list[bytes]:
        _require_claim(device)
        if device.sign_key in self._state.removed:
            raise CircleOperationError("that key was removed from the circle and cannot return")
        if self._state.is_member(device.sign_key):
            raise CircleOperationError("that device is already a member")
        added = self._commit(signer, kind, {"device": device.proof})
        return [added, self._commit(signer, EPOCH, self._epoch_body(rng))]

    def remove_device(
        self, signer: SigningKeyPair, sign_key: bytes, rng: RandomSource, *, force: bool = False,
        cutoff: Head | None = None,
    ) -> list[bytes]:
        """Remove a member; the same record starts an epoch not sealed to it.

        cutoff: the removal point, a head the device signed (cutoff.py): its entries past it
        stop counting; None keeps everything it wrote. The last device goes only with force
        (protocol/circle.md, "Removing oneself").
        """
        self._member_signer(signer)
        sign_key = bytes(sign_key)
        target = self._state.members.get(sign_key)
        if target is None:
            raise CircleOperationError("that key is not a member of the circle")
        if not force and not target.recovery and all(
            info.recovery or key == sign_key for key, info in self._state.members.items()
        ):
            # Tailscale's Tailnet Lock could lock a tailnet out by removing its last
            # signing node (tailscale/tailscale#13621): the last device always stays.
            raise CircleOperationError(
                "refusing to remove the last device: the circle would have no device left "
                "(force it if that is what you want)"
            )
        body = {"removed": sign_key, **self._epoch_body(rng, without=sign_key),
                **_cutoff_body(sign_key, cutoff)}
        return [self._commit(signer, REMOVE, body)]

    def settle_with_recovery(self, recovery_signer: SigningKeyPair, sign_key: bytes, rng: RandomSource,
                             *, cutoff: Head | None = None) -> list[bytes]:
        """The recovery member removes a device, outranking what that device did meanwhile.

        The remove builds on the circle as it was before the dispute: every record except
        the removes of that device, the device's records that no such remove saw, and what
        builds on either. So everything the device did in the dispute (removing the owner's
        devices, or the recovery member) is concurrent with this remove, which a device's
        remove cannot threaten (protocol/circle.md, "The recovery words outrank devices").
        """
        sign_key = bytes(sign_key)
        disputed = 0
        removes = [i for i, r in enumerate(self._records) if r.target == sign_key]
        seen_by_a_remove = 0
        for i in removes:
            seen_by_a_remove |= self._ancestors[i]
        for i, record in enumerate(self._records):
            if record.target == sign_key or (record.author == sign_key and not seen_by_a_remove >> i & 1):
                disputed |= 1 << i
        before = 0
        for i in range(len(self._records)):
            if not (self._ancestors[i] | 1 << i) & disputed:
                before |= 1 << i
        view = self._view(before)
        member = view.members.get(bytes(recovery_signer.public))
        if member is None or not member.recovery:
            raise CircleOperationError("this recovery key is not enrolled in the circle")
        target = view.members.get(sign_key)
        if target is None or target.recovery:
            raise CircleOperationError("that key was not a device of the circle before the dispute")
        parents = {r.hash for i, r in enumerate(self._records) if before >> i & 1} - {
            p for i, r in enumerate(self._records) if before >> i & 1 for p in r.parents
        }
        number = view.max_epoch + 1
        recipients = sorted(info.dh_key for key, info in view.members.items() if key != sign_key)
        epoch_key = rng(KEY_LEN)
        body = {"removed": sign_key, "boxes": [[dh, seal(dh, epoch_key)] for dh in recipients], "epoch": number,
                **_cutoff_body(sign_key, cutoff)}
        record = Record.sign(recovery_signer, self.circle_id, REMOVE, parents, body)
        self._merge_decoded([record])
        return [record.encoded]

    def rotate_epoch(self, signer: SigningKeyPair, rng: RandomSource) -> list[bytes]:
        self._member_signer(signer)
        return [self._commit(signer, EPOCH, self._epoch_body(rng))]

    def enrol_recovery(self, signer: SigningKeyPair, recovery: DeviceInfo, rng: RandomSource) -> list[bytes]:
        """Enrol a recovery member; any previous recovery member is removed (replaced)."""
        self._member_signer(signer)
        if not recovery.recovery:
            raise CircleOperationError("a recovery member has recovery=True")
        previous = [info.sign_key for info in self._state.recovery_members()]
        if not previous:
            return self._enrol(signer, RECOVERY, recovery, rng)
        _require_claim(recovery)
        out = [self._commit(signer, RECOVERY, {"device": recovery.proof})]
        for old in previous:
            body = {"removed": old, **self._epoch_body(rng, without=old)}
            out.append(self._commit(signer, REMOVE, body))
        return out

    def recover(self, recovery_signer: SigningKeyPair, new_device: DeviceInfo, rng: RandomSource) -> list[bytes]:
        """Add new_device with records signed by the recovery member, then a new epoch."""
        member = self._state.members.get(bytes(recovery_signer.public))
        if member is None or not member.recovery:
            raise CircleOperationError("this recovery key is not enrolled in the circle")
        if new_device.recovery:
            raise CircleOperationError("recover adds a device, not a recovery key")
        return self._enrol(recovery_signer, ADD, new_device, rng)

    # -- epoch keys (protocol/circle.md, "An epoch is the record that made it"; epochs.py)

    def epoch_key(self, dh: DHKeyPair, number: int | None = None) -> bytes:
        """The epoch key sealed to dh: the current epoch's by default, else what number resolves to."""
        return epochs.epoch_key(self, dh, number)

    def current_keys(self, dh: DHKeyPair) -> EpochKeys:
        """The subkeys of the current epoch record: what sealing, deposits and adverts use."""
        return epochs.current_keys(self, dh)

    def readable_epochs(self, dh: DHKeyPair) -> dict[int, bytes]:
        """Each epoch number whose resolved record is sealed to dh, with its key."""
        return epochs.readable_epochs(self, dh)

    def recent_epochs(self, dh: DHKeyPair, count: int) -> list[EpochKeys]:
        """The current epoch's keys, then those the next lower numbers resolve to (sealed to dh)."""
        return epochs.recent_epochs(self, dh, count)

    def announcement_keys(self, dh: DHKeyPair, recipient_dh: bytes, depth: int) -> list[EpochKeys]:
        """Keys to seal a membership change under for a recipient that may have missed it."""
        return epochs.announcement_keys(self, dh, recipient_dh, depth)

    def readable_epoch_records(self, dh: DHKeyPair) -> list[tuple[bytes, EpochKeys]]:
        """(record hash, keys) of every counting epoch record sealed to dh: current, then newest."""
        return epochs.readable_epoch_records(self, dh)


def _cutoff_body(sign_key: bytes, cutoff: Head | None) -> dict[str, Any]:
    """A remove body's removal point field (cutoff.py), checked; {} for none."""
    if cutoff is None:
        return {}
    if cutoff_from_wire(cutoff_wire(cutoff), sign_key) is None:
        raise CircleOperationError("the cutoff is not a head of that device's log")
    return {"cutoff": cutoff_wire(cutoff)}


def _require_claim(device: DeviceInfo) -> None:
    """A device is enrolled by its own claim, which must describe exactly this DeviceInfo."""
    if not device.proof:
        raise CircleOperationError(
            "the device carries no claim: use DeviceInfo.verify_claim(claim) or .claimed(signer)"
        )
    try:
        claimed = DeviceInfo.verify_claim(device.proof)
    except RecordRejected as err:
        raise CircleOperationError(f"the device's claim is invalid ({err.reason})") from err
    if claimed != device:
        raise CircleOperationError("the device's claim describes another device")

